"""Unit tests for the /metrics, /healthz, /readyz HTTP server: real sockets on port 0."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec

import httpx
import pytest

from dicom_adapter.observability.http import MAX_HEAD, READ_TIMEOUT, HealthServer, answer
from dicom_adapter.observability.metrics import MetricsRegistry

P = ParamSpec("P")


def sync(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body on a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


class Readiness:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@asynccontextmanager
async def serving(
    registry: MetricsRegistry | None = None,
    ready: Callable[[], bool] = lambda: True,
    *,
    max_head: int = MAX_HEAD,
    read_timeout: float = READ_TIMEOUT,
) -> AsyncIterator[HealthServer]:
    registry = registry or MetricsRegistry()
    server = HealthServer(
        registry.render,
        ready,
        host="127.0.0.1",
        port=0,
        max_head=max_head,
        read_timeout=read_timeout,
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def raw(port: int, data: bytes, *, close_write: bool = True) -> bytes:
    """Send `data`, read until the server closes; the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if close_write:
            writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


@sync
async def test_metrics_endpoint_serves_the_registry() -> None:
    registry = MetricsRegistry()
    registry.counter("demo_requests", "Requests.").inc(4)
    async with serving(registry) as server, httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{server.port}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert response.headers["connection"] == "close"
    assert "demo_requests_total 4.0\n" in response.text
    assert response.text == registry.render()


@sync
async def test_healthz_and_readyz_follow_the_service() -> None:
    readiness = Readiness()
    async with serving(ready=readiness) as server, httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{server.port}"
        assert (await client.get(base + "/healthz")).status_code == 200
        assert (await client.get(base + "/readyz")).status_code == 503
        readiness.ready = True
        ready = await client.get(base + "/readyz?verbose")
        assert (ready.status_code, ready.text) == (200, "ready\n")
        readiness.ready = False  # e.g. draining after SIGTERM
        assert (await client.get(base + "/readyz")).status_code == 503
        assert (await client.get(base + "/healthz")).text == "ok\n"


@sync
async def test_unknown_path_and_other_methods() -> None:
    async with serving() as server, httpx.AsyncClient() as client:
        base = f"http://127.0.0.1:{server.port}"
        assert (await client.get(base + "/")).status_code == 404
        assert (await client.get(base + "/metricsx")).status_code == 404
        posted = await client.post(base + "/metrics", content=b"x")
        assert posted.status_code == 405
        assert posted.headers["allow"] == "GET"
        assert (await client.delete(base + "/readyz")).status_code == 405


@sync
async def test_bare_lf_http10_client_is_answered() -> None:
    async with serving() as server:
        response = await raw(server.port, b"GET /healthz HTTP/1.0\n\n")
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /metrics SMTP/1.0\r\n\r\n",
        b"G\xc3\xa9T /metrics HTTP/1.1\r\n\r\n",
        b"GET http://[::1/metrics HTTP/1.1\r\n\r\n",
    ],
)
@sync
async def test_garbage_gets_400_and_the_server_keeps_serving(garbage: bytes) -> None:
    async with serving() as server:
        assert status_of(await raw(server.port, garbage)) == 400
        assert status_of(await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200


@sync
async def test_oversized_head_is_refused() -> None:
    async with serving(max_head=1024) as server:
        huge_line = b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
        assert status_of(await raw(server.port, huge_line, close_write=False)) == 431
        many = b"GET /metrics HTTP/1.1\r\n" + b"X-H: 1234567890\r\n" * 200 + b"\r\n"
        assert status_of(await raw(server.port, many, close_write=False)) == 431
        assert status_of(await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200


@sync
async def test_half_request_then_close_and_silent_clients_are_dropped() -> None:
    async with serving(read_timeout=0.2) as server:
        assert await raw(server.port, b"GET /metr") == b""  # closed mid-head: no answer
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # silent: closed on timeout
        finally:
            writer.close()
        assert status_of(await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200


@sync
async def test_failing_render_and_readiness_do_not_crash() -> None:
    def render() -> str:
        raise RuntimeError("boom")

    def ready() -> bool:
        raise RuntimeError("boom")

    server = HealthServer(render, ready, host="127.0.0.1", port=0)
    await server.start()
    try:
        assert status_of(await raw(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")) == 500
        assert status_of(await raw(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")) == 503
        assert status_of(await raw(server.port, b"GET /healthz HTTP/1.1\r\n\r\n")) == 200
    finally:
        await server.stop()


@sync
async def test_accepted_socket_has_tcp_nodelay_and_stop_closes_idle_connections() -> None:
    seen: list[int] = []
    server = HealthServer(lambda: "", lambda: True, host="127.0.0.1", port=0)
    original = server._serve

    async def spy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        task = asyncio.ensure_future(original(reader, writer))
        await asyncio.sleep(0.05)
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await task

    server._serve = spy  # type: ignore[method-assign]
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        await asyncio.sleep(0.1)
        await asyncio.wait_for(server.stop(), 5)  # an idle client does not hold up stopping
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    assert seen and seen[0] != 0


@sync
async def test_port_in_use_raises_oserror() -> None:
    async with serving() as first:
        second = HealthServer(lambda: "", lambda: True, host="127.0.0.1", port=first.port)
        with pytest.raises(OSError):
            await second.start()


def test_answer_is_pure_routing() -> None:
    def render() -> str:
        return "x 1\n"

    def ready() -> bool:
        return True

    assert answer(b"GET /metrics HTTP/1.1\r\n", render, ready).body == b"x 1\n"
    assert answer(b"GET http://host:9090/metrics HTTP/1.1", render, ready).status == 200
    assert answer(b"HEAD /metrics HTTP/1.1", render, ready).status == 405
    assert answer(b"GET /nothing HTTP/1.1", render, ready).status == 404
    encoded = answer(b"GET /healthz HTTP/1.1", render, ready).encode()
    assert encoded == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nok\n"
    )
