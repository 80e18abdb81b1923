"""StoreAssociation (the asyncio C-STORE SCU) against real peers: DCMTK storescp, pynetdicom.

No sleeps and no fixed ports: every peer listens on a free port, and waits on other threads
are bounded waits on events. Each test drives the SCU with `asyncio.run` under a guard, so
a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_adapter.dicom.part10 import DatasetFile, FileMeta, read_file_meta
from dicom_adapter.dimse import pdu, store_scu
from dicom_adapter.dimse.scu import (
    AssociationRejectedError,
    AssociationTarget,
    PeerUnreachableError,
    RequestedContext,
    ScuTimeouts,
)
from dicom_adapter.dimse.store_scu import AssociationLostError, StoreAssociation, StoreResponse
from dicom_adapter.errors import InvalidDatasetError
from tests.rig import StoreSCP, free_port, generate_ct_series, wait_until_async

T = TypeVar("T")

HOST = "127.0.0.1"
CALLING = "STORE_SCU"
TIMEOUTS = ScuTimeouts(connection=5.0, acse=5.0, dimse=10.0, network=10.0)
CT_EXPLICIT = RequestedContext(CTImageStorage, (ExplicitVRLittleEndian,))
GUARD = 60.0
WAIT = 10.0

Handler = Callable[[Any], Any]


def _run(main: Coroutine[Any, Any, T]) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(main, GUARD)

    return asyncio.run(guarded())


@dataclass(frozen=True)
class Instance:
    """A generated Part-10 file, its bytes and its meta."""

    path: Path
    raw: bytes
    meta: FileMeta

    @property
    def dataset(self) -> bytes:
        return self.raw[self.meta.dataset_offset :]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Instance]:
    """20 small CT instances (explicit VR little endian), ~32 KB of pixel data each."""
    paths = generate_ct_series(tmp_path_factory.mktemp("ct"), 20, rows=128, cols=128, seed=3)
    instances = []
    for path in paths:
        raw = path.read_bytes()
        instances.append(Instance(path, raw, read_file_meta(raw)))
    return instances


# --------------------------------------------------------------------------------------------
# pynetdicom storage SCP, in-process


@dataclass
class PyScp:
    """A running pynetdicom storage SCP and what it saw."""

    aet: str
    port: int
    requests: list[Any] = field(default_factory=list)
    datasets: list[bytes] = field(default_factory=list)
    pdu_lengths: list[int] = field(default_factory=list)  # of every P-DATA-TF received
    fragments: list[int] = field(default_factory=list)  # length of every data set PDV
    accepted: list[str] = field(default_factory=list)  # calling AE title per association
    released: threading.Event = field(default_factory=threading.Event)
    aborted: threading.Event = field(default_factory=threading.Event)

    def target(self, called_aet: str | None = None) -> AssociationTarget:
        return AssociationTarget(CALLING, called_aet or self.aet, HOST, self.port)


StartScp = Callable[..., PyScp]


@pytest.fixture(scope="module")
def _servers() -> Iterator[list[Any]]:
    """Every pynetdicom server of the module, shut down together at its end.

    Each shutdown waits out socketserver's 0.5 s poll interval: in parallel, only once.
    """
    servers: list[Any] = []
    yield servers
    stoppers = [threading.Thread(target=server.shutdown) for server in servers]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()


@pytest.fixture
def start_scp(_servers: list[Any]) -> StartScp:
    """Factory: `start_scp(status=..., max_pdu=..., require_called_aet=...)` -> PyScp."""

    def start(
        status: Handler | None = None,
        *,
        max_pdu: int = 16382,
        require_called_aet: bool = False,
        aet: str = "PYSCP",
    ) -> PyScp:
        ae = AE(ae_title=aet)
        ae.supported_contexts = StoragePresentationContexts
        ae.maximum_pdu_size = max_pdu
        ae.require_called_aet = require_called_aet
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = WAIT
        scp = PyScp(aet, 0)

        def on_store(event: Any) -> Any:
            scp.requests.append(event.request)
            scp.datasets.append(event.request.DataSet.getvalue())
            return status(event) if status is not None else 0x0000

        def on_data(event: Any) -> None:
            if event.data[0] == pdu.P_DATA_TF:
                scp.pdu_lengths.append(len(event.data) - 6)
                scp.fragments += [
                    len(pdv.data) for pdv in pdu.parse_p_data(event.data[6:]) if not pdv.command
                ]

        handlers: list[Any] = [
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_DATA_RECV, on_data),
            (evt.EVT_ACCEPTED, lambda event: scp.accepted.append(event.assoc.requestor.ae_title)),
            (evt.EVT_RELEASED, lambda event: scp.released.set()),
            (evt.EVT_ABORTED, lambda event: scp.aborted.set()),
        ]
        server = ae.start_server((HOST, 0), block=False, evt_handlers=handlers)
        assert server is not None
        _servers.append(server)
        scp.port = server.server_address[1]
        return scp

    return start


async def _open(target: AssociationTarget, *contexts: RequestedContext) -> StoreAssociation:
    return await StoreAssociation.open(target, list(contexts) or [CT_EXPLICIT], timeouts=TIMEOUTS)


async def _store(assoc: StoreAssociation, instance: Instance, **kwargs: Any) -> StoreResponse:
    context_id = assoc.context_for(instance.meta.sop_class_uid, instance.meta.transfer_syntax)
    assert context_id is not None
    return await assoc.c_store(
        context_id,
        instance.meta.sop_class_uid,
        instance.meta.sop_instance_uid,
        DatasetFile(instance.path, instance.meta.dataset_offset),
        **kwargs,
    )


# --------------------------------------------------------------------------------------------
# DCMTK storescp


class CountingProxy:
    """A TCP relay in front of a peer that counts the connections made through it."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._relays: list[asyncio.Future[Any]] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and wait until every relayed connection has ended."""
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*self._relays)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        relay = asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self._relays.append(relay)
        await relay


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def test_storescp_receives_identical_data_sets_on_one_association(
    tmp_path: Path, series: list[Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read files in small chunks that PDV fragments do not divide (fragments stay even)
    monkeypatch.setattr(store_scu, "FILE_READ", 10_006)
    half = len(series) // 2
    with StoreSCP(tmp_path / "received") as scp:

        async def main() -> tuple[list[StoreResponse], int, int]:
            proxy = CountingProxy(scp.port)
            port = await proxy.start()
            try:
                target = AssociationTarget(CALLING, scp.aet, HOST, port)
                assoc = await _open(target)
                assert assoc.accepted == {(CTImageStorage, ExplicitVRLittleEndian): 1}
                responses = []
                for instance in series[:half]:  # bytes: a memoryview from dataset_offset
                    view = memoryview(instance.raw)[instance.meta.dataset_offset :]
                    responses.append(
                        await assoc.c_store(
                            1, instance.meta.sop_class_uid, instance.meta.sop_instance_uid, view
                        )
                    )
                for instance in series[half:]:  # files: DatasetFile(path, offset)
                    responses.append(await _store(assoc, instance))
                assert assoc.is_open
                arrived = scp.count()  # storescp wrote each file before it answered
                await assoc.release()
                assert not assoc.is_open
                return responses, arrived, proxy.connections
            finally:
                await proxy.close()

        responses, arrived, connections = _run(main())
        assert responses == [StoreResponse(0x0000)] * len(series)
        assert arrived == len(series)
        assert connections == 1
        sent = {instance.meta.sop_instance_uid: instance for instance in series}
        assert scp.received_uids() == set(sent)
        for path in scp.files():
            raw = path.read_bytes()
            meta = read_file_meta(raw)
            instance = sent[meta.sop_instance_uid]
            assert (meta.sop_class_uid, meta.transfer_syntax) == (
                CTImageStorage,
                ExplicitVRLittleEndian,
            )
            assert raw[meta.dataset_offset :] == instance.dataset


# --------------------------------------------------------------------------------------------
# pynetdicom storage SCP


def test_custom_statuses_and_move_originator(start_scp: StartScp, series: list[Instance]) -> None:
    answers: list[Any] = [0xA700, 0xB000, 0x0000]

    def status(event: Any) -> Any:
        code = answers.pop(0)
        if code == 0x0000:
            return code
        reply = Dataset()
        reply.Status = code
        reply.ErrorComment = f"status {code:04X}"
        return reply

    scp = start_scp(status)

    async def main() -> list[StoreResponse]:
        assoc = await _open(scp.target())
        responses = [
            await _store(
                assoc, series[0], move_originator_aet="MOVE_SCU", move_originator_message_id=7
            ),
            await _store(assoc, series[1], move_originator_aet="ODD", move_originator_message_id=0),
            await _store(assoc, series[2]),
        ]
        await assoc.release()
        return responses

    assert _run(main()) == [
        StoreResponse(0xA700, "status A700"),
        StoreResponse(0xB000, "status B000"),
        StoreResponse(0x0000, ""),
    ]
    first, second, third = scp.requests
    assert first.MoveOriginatorApplicationEntityTitle == "MOVE_SCU"
    assert first.MoveOriginatorMessageID == 7
    assert second.MoveOriginatorApplicationEntityTitle == "ODD"
    assert second.MoveOriginatorMessageID == 0
    assert third.MoveOriginatorApplicationEntityTitle is None
    assert third.MoveOriginatorMessageID is None
    assert [r.MessageID for r in scp.requests] == [1, 2, 3]
    assert [r.AffectedSOPInstanceUID for r in scp.requests] == [
        s.meta.sop_instance_uid for s in series[:3]
    ]
    assert scp.datasets == [s.dataset for s in series[:3]]
    assert scp.accepted == [CALLING]  # one association for all three
    assert scp.released.wait(WAIT)


def test_unencodable_uid_fails_that_instance_only(
    start_scp: StartScp, series: list[Instance]
) -> None:
    """A SOP Instance UID from upstream that no C-STORE-RQ can carry (too long) fails that
    instance before anything is sent; the association stays open for the next one."""
    scp = start_scp(lambda event: 0x0000)

    async def main() -> tuple[bool, StoreResponse]:
        assoc = await _open(scp.target())
        with pytest.raises(InvalidDatasetError):
            await assoc.c_store(1, CTImageStorage, "1." * 40, b"")
        still_open = assoc.is_open
        response = await _store(assoc, series[0])
        await assoc.release()
        return still_open, response

    assert _run(main()) == (True, StoreResponse(0x0000))
    assert [r.AffectedSOPInstanceUID for r in scp.requests] == [series[0].meta.sop_instance_uid]


@pytest.mark.parametrize("max_pdu", [4096, 4097])
def test_small_peer_max_pdu_fragments_the_data_set(
    start_scp: StartScp, series: list[Instance], max_pdu: int
) -> None:
    """Many fragments, each within the peer's limit and even (PS3.8 E.1) even for an odd one."""
    scp = start_scp(max_pdu=max_pdu)

    async def main() -> StoreResponse:
        assoc = await _open(scp.target())
        response = await _store(assoc, series[0])
        await assoc.release()
        return response

    assert _run(main()) == StoreResponse(0x0000)
    assert scp.datasets == [series[0].dataset]
    assert max(scp.pdu_lengths) <= max_pdu
    assert sum(scp.fragments) == len(series[0].dataset)
    assert len(scp.fragments) == -(-len(series[0].dataset) // 4090)  # all full but the last
    assert all(length % 2 == 0 for length in scp.fragments)


def test_release_is_seen_by_the_peer(start_scp: StartScp) -> None:
    scp = start_scp()

    async def main() -> bool:
        assoc = await _open(scp.target())
        await assoc.release()
        await assoc.release()  # a second release does nothing
        return assoc.is_open

    assert _run(main()) is False
    assert scp.released.wait(WAIT)
    assert not scp.aborted.is_set()


def test_accepted_contexts_and_syntaxes(start_scp: StartScp) -> None:
    scp = start_scp()
    unknown_sop_class = "1.2.826.0.1.3680043.8.498.999"

    async def main() -> StoreAssociation:
        assoc = await _open(
            scp.target(),
            RequestedContext(CTImageStorage, (JPEG2000, ExplicitVRLittleEndian)),
            RequestedContext(CTImageStorage, (ImplicitVRLittleEndian,)),
            RequestedContext(unknown_sop_class, (ImplicitVRLittleEndian,)),
        )
        await assoc.release()
        return assoc

    assoc = _run(main())
    assert assoc.accepted == {
        (CTImageStorage, ExplicitVRLittleEndian): 1,
        (CTImageStorage, ImplicitVRLittleEndian): 3,
    }
    assert assoc.context_for(CTImageStorage, ExplicitVRLittleEndian) == 1
    assert assoc.context_for(CTImageStorage, JPEG2000) is None
    assert assoc.context_for(unknown_sop_class, ImplicitVRLittleEndian) is None
    assert assoc.accepted_syntaxes(CTImageStorage) == [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    ]
    assert assoc.accepted_syntaxes(unknown_sop_class) == []


def test_peer_abort_mid_operation(start_scp: StartScp, series: list[Instance]) -> None:
    def abort(event: Any) -> Any:
        event.assoc.abort()
        return 0x0000

    scp = start_scp(abort)

    async def main() -> StoreAssociation:
        assoc = await _open(scp.target())
        with pytest.raises(AssociationLostError, match="PYSCP"):
            await _store(assoc, series[0])
        assert not assoc.is_open
        with pytest.raises(AssociationLostError, match="closed"):
            await _store(assoc, series[1])
        await assoc.release()  # nothing left to release
        assoc.abort()  # nor to abort
        return assoc

    assert not _run(main()).is_open
    assert len(scp.requests) == 1


# --------------------------------------------------------------------------------------------
# Associations that never open


def test_nothing_listening() -> None:
    target = AssociationTarget(CALLING, "NOBODY", HOST, free_port())
    with pytest.raises(PeerUnreachableError, match=f"NOBODY@{HOST}"):
        _run(_open(target))


def test_called_ae_title_rejected(start_scp: StartScp) -> None:
    scp = start_scp(require_called_aet=True)
    with pytest.raises(
        AssociationRejectedError,
        match=r"WRONG_AE@.* rejected permanently: called AE title not recognized",
    ):
        _run(_open(scp.target("WRONG_AE")))
    assert scp.accepted == []


def test_no_accepted_context(start_scp: StartScp) -> None:
    scp = start_scp()
    with pytest.raises(AssociationRejectedError, match="accepted none of the proposed contexts"):
        _run(_open(scp.target(), RequestedContext(CTImageStorage, (JPEG2000,))))
    assert scp.accepted == [CALLING]
    assert scp.released.wait(WAIT)  # released, not just dropped


@pytest.mark.parametrize("count", [0, 129])
def test_context_count_checked(count: int) -> None:
    target = AssociationTarget(CALLING, "NOBODY", HOST, free_port())
    contexts = [CT_EXPLICIT] * count
    with pytest.raises(ValueError, match="presentation contexts"):
        _run(StoreAssociation.open(target, contexts))


# --------------------------------------------------------------------------------------------
# Cancelled mid-data-set


class StallingRelay:
    """A TCP relay to a peer that stops reading from the SCU after `stall_after` bytes."""

    def __init__(self, port: int, stall_after: int) -> None:
        self.target_port = port
        self.stall_after = stall_after
        self.stalled = asyncio.Event()
        self.resume = asyncio.Event()
        self.closed_at: float | None = None  # when the SCU's connection ended (EOF or reset)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Future[Any]] = []

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, HOST, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        back = asyncio.ensure_future(_pipe(up_reader, writer))
        self._tasks.append(back)
        forwarded = 0
        try:
            while chunk := await reader.read(1 << 16):
                up_writer.write(chunk)
                await up_writer.drain()
                forwarded += len(chunk)
                if forwarded > self.stall_after:
                    self.stalled.set()
                    await self.resume.wait()
                    while await reader.read(1 << 20):  # what the SCU had sent before it ended
                        pass
                    break
        except OSError:
            pass
        self.closed_at = asyncio.get_running_loop().time()
        up_writer.close()
        writer.close()


def test_cancelled_c_store_resets_the_connection_instead_of_releasing(
    start_scp: StartScp, tmp_path: Path
) -> None:
    scp = start_scp()
    meta = FileMeta(CTImageStorage, "1.2.3.4.5", ExplicitVRLittleEndian, 0)
    big = bytes(48 << 20)  # more than the socket buffers between us and the relay hold

    async def main() -> tuple[float, float, bool]:
        relay = StallingRelay(scp.port, stall_after=1 << 20)
        port = await relay.start()
        try:
            assoc = await _open(AssociationTarget(CALLING, scp.aet, HOST, port))
            context_id = assoc.context_for(meta.sop_class_uid, meta.transfer_syntax)
            assert context_id is not None
            store = asyncio.ensure_future(
                assoc.c_store(context_id, meta.sop_class_uid, meta.sop_instance_uid, big)
            )
            await asyncio.wait_for(relay.stalled.wait(), WAIT)
            loop = asyncio.get_running_loop()
            cancelled_at = loop.time()
            store.cancel()
            with pytest.raises(asyncio.CancelledError):
                await store
            relay.resume.set()
            await assoc.release()  # nothing to release: returns at once
            released_in = loop.time() - cancelled_at
            await wait_until_async(
                lambda: relay.closed_at is not None, WAIT, "the cancelled association to close"
            )
            assert relay.closed_at is not None
            return released_in, relay.closed_at - cancelled_at, assoc.is_open
        finally:
            await relay.close()

    released_in, closed_in, still_open = _run(main())
    assert not still_open
    assert released_in < 0.5
    assert closed_in < 1.0
    assert scp.requests == []  # the peer never saw a complete C-STORE
