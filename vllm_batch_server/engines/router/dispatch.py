"""Which waiting request gets which free window slot: the members the router routes to, their windows,
and the queues of requests waiting for a slot.

A freed slot on member M takes, in order: the oldest waiting request whose prompt prefix M holds in its cache
(affinity.py); else the oldest request no member holds a prefix of (which M then holds); else the oldest
request of all, so that no member idles while work waits. Lower `priority` values go first. A request that
already failed on a member goes elsewhere first. The router (router.py) decides everything else: what a
failure means, when a member leaves or rejoins the rotation.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from vllm_batch_server.engines.base import Engine, EngineError
from vllm_batch_server.engines.router.affinity import AffinityTable
from vllm_batch_server.engines.router.window import Window

# How early a timer may fire (uvloop's clock counts milliseconds).
TIMER_SLACK = 0.005
# Longest pause a member may ask for (Retry-After).
MAX_PAUSE = 60.0


class MemberState(str, Enum):
    IDLE = "idle"  # no model started
    STARTING = "starting"
    UP = "up"  # in rotation
    DOWN = "down"  # out of rotation; being brought back


@dataclass
class Member:
    index: int
    engine: Engine
    name: str
    kind: str  # "local", "http" or "ray"
    window: Window
    state: MemberState = MemberState.IDLE
    reason: str | None = None  # why it is down
    busy: int = 0  # requests assigned: in flight, or about to be sent
    inflight: dict[str, asyncio.Task[Any]] = field(default_factory=dict)
    failures: int = 0  # consecutive failed attempts
    garbage: float = 0.0  # recent 200s that were no answers: +1 each, decaying with every good answer
    garbage_outs: int = 0  # times taken out for them since it last served a while: its pause out grows
    probe_failures: int = 0
    paused_until: float = 0.0  # time.monotonic(): asked to wait (Retry-After)
    recovery: asyncio.Task[None] | None = None
    generation: int = 0  # times it came into rotation: a failure seen from an earlier one is old news
    # Counters, for logs and benchmarks.
    completed: int = 0
    failed_attempts: int = 0
    moved: int = 0  # requests moved to other members when this one was taken out
    taken_out: int = 0
    bad_answers: int = 0  # 200s that were no answer of the endpoint (also in failed_attempts)

    @property
    def bit(self) -> int:
        return 1 << self.index

    def free(self, now: float) -> bool:
        return self.state is MemberState.UP and self.busy < self.window.limit and now >= self.paused_until

    def snapshot(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state.value, "reason": self.reason,
                "window": self.window.limit, "window_cap": self.window.cap, "in_flight": len(self.inflight),
                "completed": self.completed, "failed_attempts": self.failed_attempts, "moved": self.moved,
                "taken_out": self.taken_out, "bad_answers": self.bad_answers}


@dataclass(eq=False)
class Ticket:
    """A request waiting for a window slot."""

    priority: int
    seq: int
    chunks: list[int]
    preferred: int  # bit mask of the members holding its prefix; 0: any
    avoid: int  # bit mask of the members it already failed on: others first
    future: asyncio.Future[Member]
    gone: bool = False  # assigned or abandoned: skipped when popped from a queue


class _Queue:
    """Tickets by (priority, seq), with lazy removal: a ticket taken through another queue stays here until it
    surfaces, or until the queue is compacted (so a queue nobody pops, such as that of a member out of rotation,
    does not grow with every request of a long batch)."""

    COMPACT_AT = 4096

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, Ticket]] = []
        self._pushes = itertools.count()  # ties: a retried request's new ticket has its old one's seq
        self._compact_at = self.COMPACT_AT

    def push(self, ticket: Ticket) -> None:
        heapq.heappush(self._heap, (ticket.priority, ticket.seq, next(self._pushes), ticket))
        if len(self._heap) >= self._compact_at:
            self._heap = [entry for entry in self._heap if not entry[3].gone]
            heapq.heapify(self._heap)
            self._compact_at = max(self.COMPACT_AT, 2 * len(self._heap))

    def peek(self) -> Ticket | None:
        while self._heap and self._heap[0][3].gone:
            heapq.heappop(self._heap)
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Ticket | None:
        ticket = self.peek()
        if ticket is not None:
            heapq.heappop(self._heap)
        return ticket

    def clear(self) -> None:
        self._heap.clear()


class Dispatcher:
    """The slots of all members and the requests waiting for one (see the module's docstring)."""

    def __init__(self, members: list[Member], affinity: AffinityTable | None) -> None:
        self.members = members
        self._affinity = affinity
        self._seq = itertools.count()
        self._all = _Queue()
        self._free_agents = _Queue()
        self._preferring = [_Queue() for _ in members]
        self._waiting = 0
        self._pending: dict[str, Ticket] = {}  # request id -> its ticket, while it waits
        self._wake: asyncio.TimerHandle | None = None
        self._wake_due = 0.0

    @property
    def waiting(self) -> int:
        return self._waiting

    def next_seq(self) -> int:
        """A request's place in line, kept across its attempts: a moved request goes before newer ones."""
        return next(self._seq)

    def cancel(self, request_id: str) -> None:
        """Stop waiting for a slot (an abort): its `acquire` raises CancelledError."""
        ticket = self._pending.get(request_id)
        if ticket is not None and not ticket.future.done():
            ticket.future.cancel()

    async def acquire(self, request_id: str, priority: int, seq: int, chunks: list[int], avoid: int) -> Member:
        loop = asyncio.get_running_loop()
        preferred = self._affinity.preferred(chunks, self.live()) if self._affinity and chunks else 0
        ticket = Ticket(priority, seq, chunks, preferred, avoid, loop.create_future())
        self._pending[request_id] = ticket
        self._waiting += 1
        self._all.push(ticket)
        if preferred:
            for member in self.members:
                if preferred & member.bit:
                    self._preferring[member.index].push(ticket)
        else:
            self._free_agents.push(ticket)
        self.dispatch()
        try:
            return await ticket.future
        except asyncio.CancelledError:
            if not ticket.gone:
                ticket.gone = True
                self._waiting -= 1
            elif ticket.future.done() and not ticket.future.cancelled() and ticket.future.exception() is None:
                self.release(ticket.future.result())  # assigned just as it was cancelled: give the slot back
            raise
        finally:
            self._pending.pop(request_id, None)

    def dispatch(self) -> None:
        """Give free window slots to waiting requests (see the module's docstring for the order)."""
        if not self._waiting:
            return
        now = time.monotonic()
        live = self.live()
        while self._waiting:
            free = [m for m in self.members if m.free(now)]
            if not free:
                return
            progressed = False
            for member in free:  # 1: requests whose prefix this member holds
                ticket = self._pop_for(self._preferring[member.index], member, live)
                if ticket is not None:
                    self._assign(ticket, member)
                    progressed = True
            if progressed:
                continue
            for member in free:  # 2: requests no member holds a prefix of (by now: look again)
                while (ticket := self._pop_for(self._free_agents, member, live)) is not None:
                    preferred = self._affinity.preferred(ticket.chunks, live) if self._affinity else 0
                    if preferred and not preferred & member.bit:
                        ticket.preferred = preferred  # its prefix went elsewhere meanwhile: wait for there
                        for other in self.members:
                            if preferred & other.bit:
                                self._preferring[other.index].push(ticket)
                        continue
                    self._assign(ticket, member)
                    progressed = True
                    break
            if progressed:
                continue
            for member in free:  # 3: the oldest request of all, so that no member idles while work waits
                ticket = self._pop_for(self._all, member, live)
                if ticket is not None:
                    self._assign(ticket, member)
                    progressed = True
            if not progressed:
                return  # what waits avoids the free members, and others can take it

    @staticmethod
    def _pop_for(queue: _Queue, member: Member, live: int) -> Ticket | None:
        """The first ticket in `queue` that may go to `member`: one that did not fail there, unless no other
        member in rotation is left to it."""
        skipped: list[Ticket] = []
        found = None
        while (ticket := queue.pop()) is not None:
            if not ticket.avoid & member.bit or not live & ~ticket.avoid:
                found = ticket
                break
            skipped.append(ticket)
        for ticket in skipped:
            queue.push(ticket)
        return found

    def _assign(self, ticket: Ticket, member: Member) -> None:
        ticket.gone = True
        self._waiting -= 1
        member.busy += 1
        if self._affinity is not None and ticket.chunks:
            self._affinity.record(ticket.chunks, member.index)
        ticket.chunks = []  # it may linger in other queues until they are compacted: keep it small
        ticket.future.set_result(member)

    def release(self, member: Member) -> None:
        member.busy = max(0, member.busy - 1)
        self.dispatch()

    def live(self) -> int:
        mask = 0
        for member in self.members:
            if member.state is MemberState.UP:
                mask |= member.bit
        return mask

    def clear(self) -> None:
        self._all.clear()
        self._free_agents.clear()
        for queue in self._preferring:
            queue.clear()
        self._waiting = 0

    def pause(self, member: Member, seconds: float) -> None:
        member.paused_until = max(member.paused_until, time.monotonic() + min(seconds, MAX_PAUSE))
        self._arm_wake()

    def _arm_wake(self) -> None:
        """Dispatch again when the earliest pause ends (a paused member frees no slot to trigger it)."""
        now = time.monotonic()
        ends = [m.paused_until for m in self.members if m.paused_until > now]
        if not ends:
            return
        due = min(ends)
        if self._wake is not None:
            if self._wake_due <= due:
                return
            self._wake.cancel()
        self._wake_due = due
        self._wake = asyncio.get_running_loop().call_later(due - now, self._woken)

    def _woken(self) -> None:
        self._wake = None
        # Timers may fire a little early (uvloop counts milliseconds): end the pauses due by now, or a pause
        # a fraction of a millisecond from its end would be neither dispatched nor waited for again.
        due = time.monotonic() + TIMER_SLACK
        for member in self.members:
            if member.paused_until <= due:
                member.paused_until = 0.0
        self.dispatch()
        self._arm_wake()

    def fail_waiting(self, error: EngineError) -> None:
        for ticket in list(self._pending.values()):
            if not ticket.gone and not ticket.future.done():
                ticket.gone = True
                ticket.future.set_exception(error)
                ticket.future.exception()  # its waiter may be gone already: no "never retrieved" warning
        self._pending.clear()
        self.clear()

