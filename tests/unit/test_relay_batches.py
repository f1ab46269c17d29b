"""Batched delivery: a multi-recipient send (all or none) and a stream that pushes
messages in batches and takes acknowledgements on the same stream. Without a network, on
both queue stores (in memory, and in a private Redis)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from services.common.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from services.relay import domain
from services.relay.domain import MAX_ACK_IDS, MAX_SEND_BATCH, STREAM_BATCH, Relay
from services.relay.model import Message, Outgoing, QueueStore, RelayLimits
from tests.fakes.relay import Directory
from tests.support.relay_queues import BACKENDS, queue_store
from tests.unit.conftest import FakeClock


class Build(Protocol):
    async def __call__(self, directory: Directory, **limits: Any) -> tuple[Relay, QueueStore]: ...


@pytest.fixture(params=BACKENDS)
async def relay(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Build]:
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    async with contextlib.AsyncExitStack() as stores:

        async def build(directory: Directory, **limits: Any) -> tuple[Relay, QueueStore]:
            queues = await stores.enter_async_context(
                queue_store(request.param, RelayLimits(**limits), None, clock, server)
            )
            relay = Relay(queues, directory, revalidate_seconds=0.05, fetch_budget_bytes=1 << 20)
            return relay, queues

        yield build


async def allowed() -> None:
    return None


def to(*recipients: str, body: bytes = b"hi") -> list[Outgoing]:
    return [Outgoing(recipient, body + recipient.encode()) for recipient in recipients]


async def queued(r: Relay, recipient: str) -> list[bytes]:
    return [bytes(m.body) for m in await r.fetch(recipient, 0)]


# --- multi-recipient sends -------------------------------------------------------------


async def test_one_call_queues_one_message_per_recipient(relay: Build) -> None:
    r, queues = await relay(Directory("bob", "carol", "dave"))
    sent = await r.send_many("alice", to("bob", "carol", "dave"), None)
    assert [m.sender_id for m in sent] == ["alice"] * 3
    assert len({m.message_id for m in sent}) == 3
    for recipient, message in zip(("bob", "carol", "dave"), sent, strict=True):
        (got,) = await r.fetch(recipient, 0)
        assert (got.message_id, bytes(got.body)) == (message.message_id, b"hi" + recipient.encode())
    assert (await queues.stats()).queued_messages == 3


async def test_one_full_queue_refuses_the_whole_batch_naming_it(relay: Build) -> None:
    r, queues = await relay(Directory("bob", "carol", "dave"), max_queue_messages=1)
    await r.send("alice", "carol", b"first", None)
    with pytest.raises(ResourceExhausted, match=r"messages\[1\]: nothing was queued"):
        await r.send_many("alice", to("bob", "carol", "dave"), None)
    assert await queued(r, "bob") == []
    assert await queued(r, "dave") == []
    assert (await queues.stats()).queued_messages == 1


async def test_the_sender_cap_counts_the_batch_itself(relay: Build) -> None:
    r, queues = await relay(Directory("bob", "carol", "dave"), max_sender_messages=2)
    with pytest.raises(ResourceExhausted, match=r"messages\[2\]"):
        await r.send_many("alice", to("bob", "carol", "dave"), None)
    assert (await queues.stats()).queued_messages == 0
    await r.send_many("alice", to("bob", "carol"), None)
    assert (await queues.stats()).queued_messages == 2


async def test_the_total_cap_counts_the_batch_itself(relay: Build) -> None:
    body = bytes(1000)
    r, queues = await relay(Directory("bob", "carol"), max_total_bytes=2 * 1000 + 2 * 512 - 1)
    with pytest.raises(ResourceExhausted, match=r"messages\[1\]: nothing was queued: the relay"):
        await r.send_many("alice", [Outgoing("bob", body), Outgoing("carol", body)], None)
    assert (await queues.stats()).queued_messages == 0


async def test_each_message_counts_against_the_senders_rate(relay: Build) -> None:
    r, queues = await relay(Directory("bob", "carol", "dave"), sends_per_minute=2)
    with pytest.raises(ResourceExhausted, match=r"messages\[2\]: you are sending too fast"):
        await r.send_many("alice", to("bob", "carol", "dave"), None)
    assert (await queues.stats()).queued_messages == 0


async def test_an_unknown_recipient_refuses_the_whole_batch_naming_it(relay: Build) -> None:
    r, queues = await relay(Directory("bob", "dave"))
    with pytest.raises(NotFound, match=r"messages\[1\]: no active user"):
        await r.send_many("alice", to("bob", "carol", "dave"), None)
    assert (await queues.stats()).queued_messages == 0


async def test_malformed_batches_are_invalid_argument(relay: Build) -> None:
    r, _ = await relay(Directory(*(f"user{i}" for i in range(MAX_SEND_BATCH + 1))))
    with pytest.raises(InvalidArgument, match="at least one"):
        await r.send_many("alice", [], None)
    with pytest.raises(InvalidArgument, match=f"at most {MAX_SEND_BATCH}"):
        await r.send_many("alice", to(*(f"user{i}" for i in range(MAX_SEND_BATCH + 1))), None)
    with pytest.raises(InvalidArgument, match=r"messages\[2\]: recipient_id names a recipient"):
        await r.send_many("alice", to("user1", "user2", "user1"), None)
    with pytest.raises(InvalidArgument, match=r"messages\[1\]: body is required"):
        await r.send_many("alice", [Outgoing("user1", b"x"), Outgoing("user2", b"")], None)
    with pytest.raises(InvalidArgument, match=r"messages\[0\]: client_message_id"):
        await r.send_many("alice", [Outgoing("user1", b"x", "\n")], None)


async def test_a_repeated_batch_queues_each_message_once(relay: Build) -> None:
    r, queues = await relay(Directory("bob", "carol"))
    batch = [Outgoing("bob", b"1", "m-1"), Outgoing("carol", b"2", "m-2")]
    first = await r.send_many("alice", batch, None)
    again = await r.send_many("alice", batch, None)
    assert [m.message_id for m in again] == [m.message_id for m in first]
    assert (await queues.stats()).queued_messages == 2


# --- one stream both ways ----------------------------------------------------------------


class Acks:
    """The client's side of a stream: acknowledgements, sent when the test says."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[list[str] | None] = asyncio.Queue()

    def send(self, ids: list[str]) -> None:
        self._queue.put_nowait(ids)

    def close(self) -> None:
        self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[list[str]]:
        while (ids := await self._queue.get()) is not None:
            yield ids


async def settled(queues: QueueStore, messages: int) -> None:
    """Waits until the store holds `messages` (acknowledgements are applied as they
    come, beside the stream; the test's timeout ends a hang)."""
    for _ in iter(int, 1):  # polls the store: it has no event to wait on
        if (await queues.stats()).queued_messages == messages:
            return
        await asyncio.sleep(0.01)


async def test_what_is_waiting_comes_in_one_batch_and_acks_on_the_stream_delete_it(
    relay: Build,
) -> None:
    r, queues = await relay(Directory("bob"))
    sent = [(await r.send("alice", "bob", bytes([i]), None)).message_id for i in range(5)]
    acks = Acks()
    stream = r.exchange("bob", aiter(acks), allowed)
    async with contextlib.aclosing(stream):
        batch = await anext(stream)
        assert [m.message_id for m in batch] == sent
        acks.send([m.message_id for m in batch])
        await settled(queues, 0)
        later = await r.send("alice", "bob", b"later", None)
        assert [m.message_id for m in await anext(stream)] == [later.message_id]
        acks.send([])  # nothing to acknowledge: ignored
        acks.send([later.message_id])
        await settled(queues, 0)
    assert (await queues.stats()).subscribers == 0


async def test_each_message_comes_once_per_stream_until_acknowledged(relay: Build) -> None:
    r, _ = await relay(Directory("bob"))
    first = await r.send("alice", "bob", b"1", None)
    acks = Acks()
    stream = r.exchange("bob", aiter(acks), allowed)
    async with contextlib.aclosing(stream):
        assert [m.message_id for m in await anext(stream)] == [first.message_id]
        second = await r.send("alice", "bob", b"2", None)
        assert [m.message_id for m in await anext(stream)] == [second.message_id]  # not first
    again = r.exchange("bob", aiter(Acks()), allowed)
    async with contextlib.aclosing(again):  # a new stream gets what is unacknowledged
        batch = await anext(again)
        assert [m.message_id for m in batch] == [first.message_id, second.message_id]


async def test_a_long_backlog_comes_in_full_batches(relay: Build) -> None:
    count = STREAM_BATCH + 20
    r, _ = await relay(Directory("bob"), max_queue_messages=1000, sends_per_minute=1000)
    for i in range(count):
        await r.send("alice", "bob", i.to_bytes(2, "big"), None)
    stream = r.exchange("bob", aiter(Acks()), allowed)
    async with contextlib.aclosing(stream):
        sizes = [len(await anext(stream)), len(await anext(stream))]
    assert sizes == [STREAM_BATCH, 20]


async def test_a_batch_fits_in_one_grpc_message(relay: Build) -> None:
    body = bytes(300 * 1024)
    r, _ = await relay(Directory("bob"), max_body_bytes=len(body), max_queue_bytes=1 << 30)
    for _ in range(5):  # the fixture's budget: 1 MiB per gRPC message
        await r.send("alice", "bob", body, None)
    stream = r.exchange("bob", aiter(Acks()), allowed)
    async with contextlib.aclosing(stream):
        sizes = [len(await anext(stream)), len(await anext(stream))]
    assert sizes == [3, 2]  # 3 x (300 KiB + bookkeeping) within 1 MiB, not 4


async def test_an_oversized_acknowledgement_ends_the_stream(relay: Build) -> None:
    r, queues = await relay(Directory("bob"))
    acks = Acks()
    stream = r.exchange("bob", aiter(acks), allowed)
    async with contextlib.aclosing(stream):
        acks.send(["x"] * (MAX_ACK_IDS + 1))
        with pytest.raises(InvalidArgument, match=f"at most {MAX_ACK_IDS} ids"):
            await anext(stream)
    assert (await queues.stats()).subscribers == 0


async def test_an_idle_stream_ends_on_a_bad_acknowledgement_or_a_shutdown_without_a_recheck(
    relay: Build,
) -> None:
    """The stream waits for an arrival, the shutdown and its acknowledgements at once, so
    either ends it when it comes, not at the next revalidation (an hour away here)."""
    _, queues = await relay(Directory("bob"))
    r = Relay(queues, Directory("bob"), revalidate_seconds=3600, fetch_budget_bytes=1 << 20)
    acks = Acks()
    stream = r.exchange("bob", aiter(acks), allowed)
    async with contextlib.aclosing(stream):
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)  # idle: waiting for something to happen
        acks.send(["x"] * (MAX_ACK_IDS + 1))
        with pytest.raises(InvalidArgument, match=f"at most {MAX_ACK_IDS} ids"):
            async with asyncio.timeout(5):
                await waiting
    waiting = asyncio.ensure_future(anext(r.exchange("bob", aiter(Acks()), allowed)))
    await asyncio.sleep(0.01)
    queues.closing.set()
    with pytest.raises(Unavailable, match="subscribe again"):
        async with asyncio.timeout(5):
            await waiting
    assert (await queues.stats()).subscribers == 0


async def test_a_client_that_stops_acknowledging_still_receives(relay: Build) -> None:
    r, _ = await relay(Directory("bob"))
    acks = Acks()
    stream = r.exchange("bob", aiter(acks), allowed)
    async with contextlib.aclosing(stream):
        acks.close()  # half-closed: no more requests
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.1)  # several revalidation rounds with nothing to send
        sent = await r.send("alice", "bob", b"1", None)
        batch: list[Message] = await waiting
        assert [m.message_id for m in batch] == [sent.message_id]


async def test_a_revoked_token_or_a_shutdown_ends_the_stream(relay: Build) -> None:
    r, queues = await relay(Directory("bob"))

    async def revoked() -> None:
        raise Unauthenticated("revoked")

    with pytest.raises(Unauthenticated):
        await anext(r.exchange("bob", aiter(Acks()), revoked))  # rechecked every 0.05 s
    waiting = asyncio.ensure_future(anext(r.exchange("bob", aiter(Acks()), allowed)))
    await asyncio.sleep(0.05)
    queues.closing.set()
    with pytest.raises(Unavailable, match="subscribe again"):
        await waiting
    assert (await queues.stats()).subscribers == 0


async def test_streams_both_ways_share_the_caps_on_open_streams(relay: Build) -> None:
    r, _ = await relay(Directory("bob"), max_streams_per_user=1)
    stream = r.exchange("bob", aiter(Acks()), allowed)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="live subscriptions"):
        await anext(r.subscribe("bob", allowed))
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await stream.aclose()


async def test_a_busy_stream_gathers_arrivals_into_one_response_an_idle_one_does_not(
    relay: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Busy" is "sent within BUSY_SECONDS" of real time: on Redis under a loaded machine
    # the read, the send and its push took longer than 10 ms, the stream counted as idle,
    # and the test waited for a pause that never came. A minute keeps it busy here.
    monkeypatch.setattr(domain, "BUSY_SECONDS", 60.0)
    _, queues = await relay(Directory("bob"))
    entered, release = asyncio.Event(), asyncio.Event()
    idle = asyncio.Event()  # set when the stream found nothing waiting

    async def held_sleep(seconds: float) -> None:  # the coalescing pause, under the test's hand
        assert seconds == 0.003
        entered.set()
        await release.wait()

    class Watched:
        """The store, telling the test when a read came back empty."""

        def __getattr__(self, name: str) -> Any:
            return getattr(queues, name)

        async def pending(self, *args: Any, **kwargs: Any) -> list[Message]:
            found: list[Message] = await queues.pending(*args, **kwargs)
            if not found:
                idle.set()
            return found

    store: Any = Watched()
    r = Relay(
        store, Directory("bob"), revalidate_seconds=60, fetch_budget_bytes=1 << 20,
        coalesce_seconds=0.003, sleep=held_sleep,
    )  # fmt: skip
    stream = r.exchange("bob", aiter(Acks()), allowed)
    async with contextlib.aclosing(stream):
        waiting = asyncio.ensure_future(anext(stream))
        await idle.wait()
        first = await r.send("alice", "bob", b"1", None)
        assert [m.message_id for m in await waiting] == [first.message_id]
        assert not entered.is_set()  # idle until then: answered at once
        idle.clear()
        waiting = asyncio.ensure_future(anext(stream))
        await idle.wait()
        second = await r.send("alice", "bob", b"2", None)
        await entered.wait()  # busy now: it waits before reading
        third = await r.send("alice", "bob", b"3", None)
        release.set()
        assert [m.message_id for m in await waiting] == [second.message_id, third.message_id]
