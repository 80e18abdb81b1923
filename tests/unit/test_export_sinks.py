"""Unit tests for the dicom-export sinks: C-STORE association policy and refetch, STOW-RS body.

The C-STORE sink runs against a fake association (the `opener` seam), so the policy (reuse,
renegotiation, uncompressed refetch, failure classes) is tested without sockets; the
`StoreAssociation` wire protocol has its own tests.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from tests.rig import part10_bytes as part10

from dicom_adapter.dicom.part10 import DatasetFile, DatasetSource, read_file_meta
from dicom_adapter.dicom.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from dicom_adapter.dicomweb.client import DicomwebClient, RetryPolicy, make_http_client
from dicom_adapter.dicomweb.instances import FetchedInstance
from dicom_adapter.dicomweb.multipart import MultipartParser, PartData, boundary_from_content_type
from dicom_adapter.dimse.scu import (
    MAX_CONTEXTS,
    AssociationTarget,
    PeerUnreachableError,
    RequestedContext,
)
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreResponse
from dicom_adapter.exporter.sinks import (
    DEFAULT_PERMANENT_STATUSES,
    VERIFICATION,
    CStoreSink,
    CStoreSinkPool,
    PermanentFailure,
    SinkUnavailable,
    StoreConnection,
    StowSink,
    TransientFailure,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
JPEG = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
TARGET = AssociationTarget("EXPORTADAPTER", "PEER", "127.0.0.1", 11112)


def fetched(sop_class: str, uid: str, syntax: str, payload: bytes = b"pixels") -> FetchedInstance:
    data = part10(sop_class, uid, syntax, payload)
    return FetchedInstance({}, meta=read_file_meta(data, complete=True), data=data, size=len(data))


def dataset_bytes(instance: FetchedInstance) -> bytes:
    source = instance.dataset()
    assert not isinstance(source, DatasetFile)
    return bytes(source)


class FakeAssociation:
    """Accepts what its peer accepts; answers C-STOREs with the peer's next status."""

    def __init__(self, peer: FakePeer, contexts: Sequence[RequestedContext]) -> None:
        self.peer = peer
        self.contexts = list(contexts)
        self._accepted: dict[tuple[str, str], int] = {}
        for i, cx in enumerate(contexts):
            syntax = cx.transfer_syntaxes[0]
            if peer.accepts(cx.abstract_syntax, syntax):
                self._accepted.setdefault((cx.abstract_syntax, syntax), 2 * i + 1)
        self.open = True
        self.released = False
        self.stores: list[tuple[int, str, str, bytes]] = []

    @property
    def is_open(self) -> bool:
        return self.open

    @property
    def accepted(self) -> dict[tuple[str, str], int]:
        return dict(self._accepted)

    def context_for(self, sop_class_uid: str, transfer_syntax: str) -> int | None:
        return self._accepted.get((sop_class_uid, transfer_syntax))

    def accepted_syntaxes(self, sop_class_uid: str) -> list[str]:
        return [ts for (cls, ts) in self._accepted if cls == sop_class_uid]

    async def c_store(
        self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DatasetSource
    ) -> StoreResponse:
        assert self.open
        self.peer.in_flight += 1
        assert self.peer.in_flight == 1, "C-STOREs must not overlap"
        try:
            await asyncio.sleep(0)
            if self.peer.lose_next:
                self.peer.lose_next -= 1
                self.open = False
                raise AssociationLostError("the peer closed the connection")
            assert not isinstance(dataset, DatasetFile)
            self.stores.append((context_id, sop_class_uid, sop_instance_uid, bytes(dataset)))
            self.peer.stored.append((sop_class_uid, sop_instance_uid, bytes(dataset)))
            status = self.peer.statuses.pop(0) if self.peer.statuses else 0x0000
            return StoreResponse(status, "comment" if status else "")
        finally:
            self.peer.in_flight -= 1

    async def release(self) -> None:
        self.open = False
        self.released = True


class FakePeer:
    """The opener: records every association; `accepts(sop_class, syntax)` decides contexts."""

    def __init__(self, accepts: Callable[[str, str], bool] = lambda cls, ts: True) -> None:
        self.accepts = accepts
        self.associations: list[FakeAssociation] = []
        self.stored: list[tuple[str, str, bytes]] = []
        self.statuses: list[int] = []
        self.lose_next = 0
        self.unreachable = False
        self.in_flight = 0
        self.connects = 0

    async def __call__(
        self, target: AssociationTarget, contexts: Sequence[RequestedContext]
    ) -> StoreConnection:
        assert target == TARGET
        assert 1 <= len(contexts) <= MAX_CONTEXTS
        self.connects += 1
        if self.unreachable:
            raise PeerUnreachableError("cannot connect to PEER@127.0.0.1:11112")
        assoc = FakeAssociation(self, contexts)
        self.associations.append(assoc)
        return assoc

    def proposed(self, index: int = -1) -> set[tuple[str, str]]:
        return {
            (cx.abstract_syntax, cx.transfer_syntaxes[0])
            for cx in self.associations[index].contexts
        }


def sink_for(peer: FakePeer, permanent: frozenset[int] = DEFAULT_PERMANENT_STATUSES) -> CStoreSink:
    return CStoreSink(TARGET, opener=peer, permanent_statuses=permanent)


class Refetcher:
    """A Refetch that serves the instance again in the asked syntax (or a fixed one)."""

    def __init__(self, sop_class: str, uid: str, answer_syntax: str | None = None) -> None:
        self.sop_class = sop_class
        self.uid = uid
        self.answer_syntax = answer_syntax
        self.asked: list[str] = []
        self.served: list[FetchedInstance] = []

    async def __call__(self, transfer_syntax: str) -> FetchedInstance:
        self.asked.append(transfer_syntax)
        instance = fetched(
            self.sop_class, self.uid, self.answer_syntax or transfer_syntax, b"transcoded"
        )
        self.served.append(instance)
        return instance


# --------------------------------------------------------------------------------------------
# C-STORE: association reuse and contexts


def test_one_association_for_many_instances() -> None:
    peer = FakePeer()
    sink = sink_for(peer)
    instances = [fetched(CT, f"1.2.3.{i}", EXPLICIT_VR_LE) for i in range(5)]

    async def main() -> None:
        for instance in instances:
            await sink.send(instance)
        await sink.close()

    asyncio.run(main())
    assert sink.associations_opened == 1
    assert [uid for _, uid, _ in peer.stored] == [f"1.2.3.{i}" for i in range(5)]
    assert [data for _, _, data in peer.stored] == [dataset_bytes(i) for i in instances]
    assert peer.associations[0].released


def test_contexts_per_pair_plus_fallbacks_and_verification() -> None:
    peer = FakePeer()
    sink = sink_for(peer)

    async def main() -> None:
        await sink.send(fetched(CT, "1.2.3.1", JPEG))
        await sink.send(fetched(CT, "1.2.3.2", EXPLICIT_VR_LE))  # proposed as a fallback
        await sink.send(fetched(CT, "1.2.3.3", IMPLICIT_VR_LE))

    asyncio.run(main())
    assert sink.associations_opened == 1
    assert peer.proposed() == {
        (CT, JPEG),
        (CT, EXPLICIT_VR_LE),
        (CT, IMPLICIT_VR_LE),
        (VERIFICATION, IMPLICIT_VR_LE),
    }
    assert all(len(cx.transfer_syntaxes) == 1 for cx in peer.associations[0].contexts)


def test_new_sop_class_reopens_with_every_pair_seen() -> None:
    peer = FakePeer()
    sink = sink_for(peer)

    async def main() -> None:
        await sink.send(fetched(CT, "1.2.3.1", JPEG))
        await sink.send(fetched(MR, "1.2.3.2", EXPLICIT_VR_LE))
        await sink.send(fetched(CT, "1.2.3.3", JPEG))

    asyncio.run(main())
    assert sink.associations_opened == 2
    assert peer.associations[0].released
    assert {(CT, JPEG), (MR, EXPLICIT_VR_LE), (MR, IMPLICIT_VR_LE)} <= peer.proposed()
    # the newest pair comes first, so it survives the context limit
    assert peer.associations[1].contexts[0] == RequestedContext(MR, (EXPLICIT_VR_LE,))


def test_context_limit() -> None:
    peer = FakePeer()
    sink = sink_for(peer)
    classes = [f"1.2.840.10008.5.1.4.1.1.{n}" for n in range(100, 160)]

    async def main() -> None:
        for n, sop_class in enumerate(classes):
            await sink.send(fetched(sop_class, f"1.2.3.{n}", JPEG))

    asyncio.run(main())
    last = peer.associations[-1].contexts
    assert len(last) == MAX_CONTEXTS
    assert last[0] == RequestedContext(classes[-1], (JPEG,))
    assert last[-1] == RequestedContext(VERIFICATION, (IMPLICIT_VR_LE,))
    assert len(peer.stored) == len(classes)


def test_sends_are_serialized() -> None:
    peer = FakePeer()
    sink = sink_for(peer)

    async def main() -> None:
        await asyncio.gather(
            *(sink.send(fetched(CT, f"1.2.3.{i}", EXPLICIT_VR_LE)) for i in range(20))
        )

    asyncio.run(main())  # FakeAssociation asserts that no two C-STOREs overlap
    assert len(peer.stored) == 20
    assert sink.associations_opened == 1


# --------------------------------------------------------------------------------------------
# C-STORE: transcoding fallback


@pytest.mark.parametrize(
    ("peer_syntaxes", "asked"),
    [
        ({EXPLICIT_VR_LE, IMPLICIT_VR_LE}, EXPLICIT_VR_LE),
        ({IMPLICIT_VR_LE}, IMPLICIT_VR_LE),
        ({EXPLICIT_VR_LE}, EXPLICIT_VR_LE),
    ],
)
def test_refused_syntax_is_refetched_uncompressed(peer_syntaxes: set[str], asked: str) -> None:
    peer = FakePeer(lambda cls, ts: ts in peer_syntaxes)
    sink = sink_for(peer)
    refetch = Refetcher(CT, "1.2.3.1")
    original = fetched(CT, "1.2.3.1", JPEG)

    asyncio.run(sink.send(original, refetch))
    assert refetch.asked == [asked]
    (again,) = refetch.served
    assert again.data is None, "the sink discards the refetched instance"
    assert original.data is not None, "the caller discards the original"
    ((sop_class, uid, data),) = peer.stored
    assert (sop_class, uid) == (CT, "1.2.3.1")
    assert data == dataset_bytes(fetched(CT, "1.2.3.1", asked, b"transcoded"))
    assert sink.associations_opened == 1


def test_explicit_instance_to_implicit_only_peer_is_refetched() -> None:
    peer = FakePeer(lambda cls, ts: ts == IMPLICIT_VR_LE)
    refetch = Refetcher(CT, "1.2.3.1")
    asyncio.run(sink_for(peer).send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE), refetch))
    assert refetch.asked == [IMPLICIT_VR_LE]
    assert len(peer.stored) == 1


def test_no_uncompressed_context_is_permanent() -> None:
    peer = FakePeer(lambda cls, ts: ts == JPEG_LS)
    sink = sink_for(peer)
    refetch = Refetcher(CT, "1.2.3.2")

    async def main() -> None:
        await sink.send(fetched(CT, "1.2.3.1", JPEG_LS))
        await sink.send(fetched(CT, "1.2.3.2", JPEG), refetch)

    with pytest.raises(PermanentFailure, match=re.escape(f"only in transfer syntax {JPEG_LS}")):
        asyncio.run(main())
    assert refetch.asked == []
    assert len(peer.stored) == 1


def test_sop_class_refused_entirely_is_permanent() -> None:
    peer = FakePeer(lambda cls, ts: cls == VERIFICATION)
    sink = sink_for(peer)
    with pytest.raises(PermanentFailure, match="no presentation context for SOP class"):
        asyncio.run(sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE), Refetcher(CT, "1.2.3.1")))
    assert sink.associations_opened == 1


def test_refetch_in_a_refused_syntax_again_is_transient() -> None:
    peer = FakePeer(lambda cls, ts: ts == EXPLICIT_VR_LE)
    refetch = Refetcher(CT, "1.2.3.1", answer_syntax=JPEG)  # the server ignored the request
    with pytest.raises(TransientFailure, match="which the peer does not accept"):
        asyncio.run(sink_for(peer).send(fetched(CT, "1.2.3.1", JPEG), refetch))
    assert refetch.served[0].data is None
    assert peer.stored == []


def test_refused_syntax_without_refetch_is_permanent() -> None:
    peer = FakePeer(lambda cls, ts: ts == EXPLICIT_VR_LE)
    with pytest.raises(PermanentFailure, match="cannot be fetched again"):
        asyncio.run(sink_for(peer).send(fetched(CT, "1.2.3.1", JPEG)))


def test_unusable_meta_is_transient() -> None:
    """A proxy's error page looks the same: retried, and dead-lettered if it persists."""
    instance = FetchedInstance({}, data=b"junk", error="no DICM prefix")
    with pytest.raises(TransientFailure, match="no DICM prefix"):
        asyncio.run(sink_for(FakePeer()).send(instance))


@pytest.mark.parametrize(
    "changes",
    [
        {"sop_instance_uid": "1.2.\ufffd"},  # undecodable bytes
        {"sop_instance_uid": "1." * 40},  # longer than 64 characters
        {"sop_class_uid": "1." * 40},  # would fail the association for every message
    ],
)
def test_uid_no_dimse_message_can_carry_is_transient(changes: dict[str, str]) -> None:
    instance = fetched(CT, "1.2.3.1", EXPLICIT_VR_LE)
    assert instance.meta is not None
    meta = instance.meta
    instance.meta = replace(
        meta,
        sop_class_uid=changes.get("sop_class_uid", meta.sop_class_uid),
        sop_instance_uid=changes.get("sop_instance_uid", meta.sop_instance_uid),
    )
    peer = FakePeer()
    with pytest.raises(TransientFailure, match="UID no DIMSE message can carry"):
        asyncio.run(sink_for(peer).send(instance))
    assert peer.stored == []


# --------------------------------------------------------------------------------------------
# C-STORE: failures


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0xA900, PermanentFailure),  # data set does not match SOP class
        (0x0122, PermanentFailure),  # SOP class not supported
        (0xA700, TransientFailure),
        (0xA7FF, TransientFailure),
        (0x0110, TransientFailure),  # processing failure: PACS use it for passing trouble
        (0xC000, TransientFailure),
        (0xC0FF, TransientFailure),
        (0xA901, TransientFailure),  # only the listed codes, not their range
        (0x0124, TransientFailure),
    ],
)
def test_failure_status_classified_and_association_renewed(
    status: int, expected: type[Exception]
) -> None:
    peer = FakePeer()
    peer.statuses = [status]
    sink = sink_for(peer)

    async def main() -> None:
        with pytest.raises(expected, match=f"0x{status:04X}: comment"):
            await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        await sink.send(fetched(CT, "1.2.3.2", EXPLICIT_VR_LE))

    asyncio.run(main())
    assert peer.associations[0].released
    assert sink.associations_opened == 2


def test_permanent_statuses_are_configurable() -> None:
    peer = FakePeer()
    peer.statuses = [0xC001, 0xA900]
    sink = sink_for(peer, frozenset({0xC001}))

    async def main() -> None:
        with pytest.raises(PermanentFailure, match="0xC001"):
            await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        with pytest.raises(TransientFailure, match="0xA900"):
            await sink.send(fetched(CT, "1.2.3.2", EXPLICIT_VR_LE))

    asyncio.run(main())


def test_refused_sop_class_follows_0x0122() -> None:
    """Refusing every context for a SOP class is 0x0122 said in negotiation."""
    peer = FakePeer(lambda cls, ts: cls == VERIFICATION)
    with pytest.raises(TransientFailure, match="no presentation context"):
        asyncio.run(
            sink_for(peer, frozenset({0xA900})).send(fetched(CT, "1.2.3.1", IMPLICIT_VR_LE))
        )


@pytest.mark.parametrize("status", [0xB000, 0xB007])
def test_warning_status_is_stored(status: int) -> None:
    peer = FakePeer()
    peer.statuses = [status]
    asyncio.run(sink_for(peer).send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE)))


def test_unreachable_peer_fails_fast_until_a_probe_gets_through() -> None:
    peer = FakePeer()
    peer.unreachable = True
    sink = sink_for(peer)

    async def main() -> None:
        with pytest.raises(SinkUnavailable, match="cannot connect"):
            await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        for _ in range(5):  # no connect per send: no connect timeout each either
            with pytest.raises(SinkUnavailable, match="unreachable"):
                await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        assert peer.connects == 1
        with pytest.raises(SinkUnavailable):
            await sink.probe()
        assert peer.connects == 2
        peer.unreachable = False
        await sink.probe()
        await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))  # on the probe's association
        await sink.probe()  # an open association is reachable: no new connection

    asyncio.run(main())
    assert sink.associations_opened == 1
    assert peer.connects == 3
    assert len(peer.stored) == 1


def test_pool_uses_one_association_until_sends_overlap() -> None:
    peers = [FakePeer(), FakePeer(), FakePeer()]
    pool = CStoreSinkPool([sink_for(peer) for peer in peers])

    async def main() -> None:
        for i in range(4):  # one after the other: the most recently used association again
            await pool.send(fetched(CT, f"1.2.3.{i}", EXPLICIT_VR_LE))
        assert pool.associations_opened == 1
        # five at once over three associations: no association carries two at a time
        # (FakePeer asserts it), every instance is stored once
        await asyncio.gather(
            *(pool.send(fetched(CT, f"1.2.4.{i}", EXPLICIT_VR_LE)) for i in range(5))
        )
        await pool.close()

    asyncio.run(main())
    assert pool.associations_opened == 3
    stored = sorted(uid for peer in peers for _, uid, _ in peer.stored)
    assert stored == sorted([f"1.2.3.{i}" for i in range(4)] + [f"1.2.4.{i}" for i in range(5)])
    assert all(assoc.released for peer in peers for assoc in peer.associations)


def test_pool_fails_fast_once_any_member_finds_the_peer_down() -> None:
    peers = [FakePeer(), FakePeer()]
    pool = CStoreSinkPool([sink_for(peer) for peer in peers])
    for peer in peers:
        peer.unreachable = True

    async def main() -> None:
        with pytest.raises(SinkUnavailable, match="cannot connect"):
            await pool.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        for _ in range(5):
            with pytest.raises(SinkUnavailable):
                await pool.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        assert sum(peer.connects for peer in peers) == 1  # the other member never tried
        for peer in peers:
            peer.unreachable = False
        await pool.probe()
        await asyncio.gather(
            *(pool.send(fetched(CT, f"1.2.5.{i}", EXPLICIT_VR_LE)) for i in range(2))
        )

    asyncio.run(main())
    assert sum(len(peer.stored) for peer in peers) == 2
    assert pool.associations_opened == 2  # the member that failed first reconnects too


def test_lost_reused_association_is_reopened_once() -> None:
    peer = FakePeer()
    sink = sink_for(peer)

    async def main() -> None:
        await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        peer.lose_next = 1  # e.g. the peer closed the idle association
        await sink.send(fetched(CT, "1.2.3.2", EXPLICIT_VR_LE))

    asyncio.run(main())
    assert sink.associations_opened == 2
    assert [uid for _, uid, _ in peer.stored] == ["1.2.3.1", "1.2.3.2"]


def test_lost_fresh_association_is_transient() -> None:
    peer = FakePeer()
    peer.lose_next = 2
    sink = sink_for(peer)

    async def main() -> None:
        with pytest.raises(TransientFailure, match="closed the connection"):
            await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        with pytest.raises(TransientFailure):
            await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
        await sink.send(fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))

    asyncio.run(main())
    assert sink.associations_opened == 3
    assert len(peer.stored) == 1


# --------------------------------------------------------------------------------------------
# STOW-RS: in-memory and spooled instances


STOW_URL = "http://dicomweb.test/dicom-web/studies"


def stow_json(uid: str) -> dict[str, object]:
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}


def stow_with(
    handler: Callable[[httpx.Request], httpx.Response],
    instance: FetchedInstance | None = None,
) -> None:
    """STOW `instance` through a MockTransport, or probe the sink when it is None."""

    async def main() -> None:
        http = make_http_client(timeout=10.0, transport=httpx.MockTransport(handler))
        async with http:
            client = DicomwebClient(http, RetryPolicy(deadline=0.2, first_delay=0.01))
            sink = StowSink(client, STOW_URL)
            await (sink.probe() if instance is None else sink.send(instance))

    asyncio.run(main())


def stow_failure(uid: str, reason: int) -> dict[str, object]:
    item = {"00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]}}
    return {"00081198": {"vr": "SQ", "Value": [item]}}


def only_part(request: httpx.Request) -> bytes:
    parser = MultipartParser(boundary_from_content_type(request.headers["Content-Type"]))
    events = parser.feed(request.content)
    parser.close()
    return b"".join(e.data for e in events if isinstance(e, PartData))


@pytest.mark.parametrize("spooled", [False, True])
def test_stow_sends_the_part10_file(tmp_path: Path, spooled: bool) -> None:
    data = part10(CT, "1.2.3.1", EXPLICIT_VR_LE, b"x" * 3000)
    instance = fetched(CT, "1.2.3.1", EXPLICIT_VR_LE, b"x" * 3000)
    if spooled:
        path = tmp_path / "spooled.dcm"
        path.write_bytes(data)
        instance.path, instance.data = path, None
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json=stow_json("1.2.3.1"))

    stow_with(handler, instance)
    (request,) = requests
    assert int(request.headers["Content-Length"]) == len(request.content)
    assert only_part(request) == data


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (400, {}, PermanentFailure),
        (400, stow_failure("1.2.3.1", 0xC000), PermanentFailure),
        (409, stow_failure("1.2.3.1", 0xA900), PermanentFailure),
        (409, stow_failure("1.2.3.1", 0x0122), PermanentFailure),
        (409, stow_failure("1.2.3.1", 0xC000), TransientFailure),
        (409, stow_failure("1.2.3.1", 0x0110), TransientFailure),
        (409, {}, TransientFailure),
        (400, stow_failure("1.2.3.1", 0xA700), TransientFailure),
        (401, {}, TransientFailure),
        (403, {}, TransientFailure),
        (200, {}, TransientFailure),  # "success" that stored nothing (Orthanc, malformed body)
        (503, {}, SinkUnavailable),
        (500, {}, SinkUnavailable),
        (429, {}, SinkUnavailable),
        (408, {}, SinkUnavailable),
    ],
)
def test_stow_failures(code: int, body: dict[str, object], expected: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(code, json=body)

    with pytest.raises(expected) as caught:
        stow_with(handler, fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))
    assert type(caught.value) is expected


def test_stow_connection_error_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(SinkUnavailable, match="connection refused"):
        stow_with(handler, fetched(CT, "1.2.3.1", EXPLICIT_VR_LE))


@pytest.mark.parametrize(("code", "reachable"), [(405, True), (200, True), (503, False)])
def test_stow_probe_is_one_options_request(code: int, reachable: bool) -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(code)

    if reachable:
        stow_with(handler)
    else:
        with pytest.raises(SinkUnavailable, match=f"HTTP {code}"):
            stow_with(handler)
    assert [(r.method, str(r.url)) for r in requests] == [("OPTIONS", STOW_URL)]


def test_stow_probe_connection_error_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(SinkUnavailable, match="ConnectError"):
        stow_with(handler)


def instance_json(uid: str, sop_class: str) -> dict[str, object]:
    return {
        "00080018": {"vr": "UI", "Value": [uid]},
        "00080016": {"vr": "UI", "Value": [sop_class]},
    }


@pytest.mark.parametrize(
    ("stow_code", "stow_body", "qido", "stored"),
    [
        (409, {}, [instance_json("1.2.3.1", CT)], True),
        (409, stow_failure("1.2.3.1", 0x0111), [instance_json("1.2.3.1", CT)], True),
        (200, stow_failure("1.2.3.1", 0x0111), [instance_json("1.2.3.1", CT)], True),
        (409, {}, [], False),
        (409, {}, [instance_json("1.2.3.1", MR)], False),  # another SOP class: not ours
    ],
)
def test_stow_duplicate_is_stored_when_the_instance_is_there(
    stow_code: int, stow_body: dict[str, object], qido: list[object], stored: bool
) -> None:
    """A redelivered message whose first ack was lost: 409/0x0111, and QIDO finds it."""
    queries: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(stow_code, json=stow_body)
        queries.append(request)
        first_page = request.url.params.get("offset", "0") == "0"
        return httpx.Response(200, json=qido if first_page else [])

    instance = fetched(CT, "1.2.3.1", EXPLICIT_VR_LE)
    if stored:
        stow_with(handler, instance)
    else:
        with pytest.raises(TransientFailure) as caught:
            stow_with(handler, instance)
        assert type(caught.value) is TransientFailure
    query = queries[0]
    assert query.url.path == "/dicom-web/instances"
    assert query.url.params["SOPInstanceUID"] == "1.2.3.1"


def test_pool_close_releases_all_and_refuses_later_sends() -> None:
    peers = [FakePeer(), FakePeer()]
    pool = CStoreSinkPool([sink_for(peer) for peer in peers])

    async def main() -> None:
        await asyncio.gather(
            *(pool.send(fetched(CT, f"1.2.6.{i}", EXPLICIT_VR_LE)) for i in range(2))
        )
        await pool.close()
        with pytest.raises(SinkUnavailable, match="closed"):
            await pool.send(fetched(CT, "1.2.6.9", EXPLICIT_VR_LE))

    asyncio.run(main())
    assert all(a.released for peer in peers for a in peer.associations)
    assert sum(peer.connects for peer in peers) == 2  # no association opened after close
