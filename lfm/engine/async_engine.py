"""The bridge between asyncio request handlers and the engine: one background thread owns the model.

Handlers `submit` requests and read their deltas from an asyncio queue; the engine thread drains an inbox of new
requests and aborts between steps, runs `LLMEngine.step`, and hands each step's deltas back to the event loop in one
`call_soon_threadsafe`. The waiting queue is bounded: past `max_waiting` a submit raises `EngineFull` (the server
answers 429) instead of letting memory grow. An unexpected error inside a step ends the affected requests with an
error and the thread goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .llm_engine import LLMEngine, RequestDelta
from .sampling import SamplingParams

log = logging.getLogger("lfm.engine")


class EngineFull(Exception):
    """Too many requests are already waiting."""


class EngineDead(Exception):
    """The engine thread is not running."""


@dataclass(slots=True)
class EngineRequest:
    """One sequence to generate (a request with n choices is n of these)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    chat: bool = False  # chat requests also stop at <|im_end|>


@dataclass
class RequestStream:
    """The deltas of one client request (its n sequences), in order, as they are produced."""

    request_ids: list[str]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    open: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.open = set(self.request_ids)

    @property
    def finished(self) -> bool:
        return not self.open

    async def __aiter__(self) -> AsyncIterator[RequestDelta]:
        while self.open:
            d: RequestDelta = await self.queue.get()
            if d.finish_reason is not None:
                self.open.discard(d.request_id)
            yield d


@dataclass
class Observer:
    """Callbacks for metrics, called on the event loop: first-token latency, inter-token latency, token counts."""

    first_token: Callable[[float], None] = lambda s: None
    inter_token: Callable[[float], None] = lambda s: None
    prompt_tokens: Callable[[int], None] = lambda n: None
    generated_tokens: Callable[[int], None] = lambda n: None
    finished: Callable[[str], None] = lambda reason: None  # "stop" | "length" | "abort" | "error"


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, observer: Observer | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer or Observer()
        self._cv = threading.Condition()
        self._inbox: list[EngineRequest] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._timing: dict[str, tuple[float, float | None]] = {}  # id -> (arrival, last token time)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.steps = 0

    # ----------------------------------------------------------------------------------------------- lifecycle
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lfm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------------------------------------- requests
    def submit(self, reqs: list[EngineRequest]) -> RequestStream:
        """Queue a client request's sequences together (all or none)."""
        if not self.alive:
            raise EngineDead("the engine is not running")
        with self._cv:
            if len(self._inbox) + self.engine.num_waiting + len(reqs) > self.max_waiting:
                raise EngineFull(f"{self.max_waiting} requests are already waiting; retry later")
            stream = RequestStream([r.request_id for r in reqs])
            now = time.monotonic()
            for r in reqs:
                self._streams[r.request_id] = stream
                self._timing[r.request_id] = (now, None)
            self._inbox.extend(reqs)
            self._cv.notify()
        return stream

    def abort(self, stream: RequestStream) -> None:
        """Stop the stream's unfinished sequences now and free their caches (client went away)."""
        with self._cv:
            queued = {r.request_id for r in self._inbox} & stream.open
            if queued:  # not picked up by the engine thread yet: never start them
                self._inbox = [r for r in self._inbox if r.request_id not in queued]
            for rid in stream.open:
                if self._streams.pop(rid, None) is not None:  # else its last delta is already on the way
                    self.observer.finished("abort")
                    if rid not in queued:
                        self._aborts.append(rid)
                self._timing.pop(rid, None)
            stream.open.clear()
            self._cv.notify()

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + len(self._inbox)

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    # ----------------------------------------------------------------------------------------------- thread
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not (self._stop or self._inbox or self._aborts or eng.has_unfinished_requests()):
                    self._cv.wait()
                if self._stop:
                    break
                adds, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            deltas: list[RequestDelta] = []
            for rid in aborts:
                eng.abort_request(rid)
            for r in adds:
                try:
                    eng.add_request(r.request_id, r.prompt_ids, r.params, r.chat)
                except ValueError as e:  # checked at the door; a request that still fails ends alone
                    deltas.append(RequestDelta(r.request_id, finish_reason="error", error=str(e)))
            try:
                deltas += eng.step()
            except Exception as e:  # never let one bad step take the server down
                log.exception("engine step failed")
                deltas += eng.fail_all(f"internal error during generation: {type(e).__name__}: {e}")
            self.steps += 1
            if deltas:
                self._post(deltas)
        with self._cv:
            left, self._inbox = self._inbox, []
        self._post(self.engine.fail_all("server shutting down") + [
            RequestDelta(r.request_id, finish_reason="error", error="server shutting down") for r in left])

    def _post(self, deltas: list[RequestDelta]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, deltas)
        except RuntimeError:  # the event loop is already closed (shutdown): nobody is listening
            pass

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        """On the event loop: route deltas to their streams, record latencies."""
        now = time.monotonic()
        ob = self.observer
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is None:
                continue  # aborted meanwhile
            if d.token_ids:
                arrival, last = self._timing.get(d.request_id, (now, None))
                if last is None:
                    ob.first_token(now - arrival)
                    ob.prompt_tokens(d.prompt_tokens)
                else:
                    ob.inter_token(now - last)
                ob.generated_tokens(len(d.token_ids))
                self._timing[d.request_id] = (arrival, now)
            if d.finish_reason is not None:
                ob.finished(d.finish_reason)
                self._streams.pop(d.request_id, None)
                self._timing.pop(d.request_id, None)
            stream.queue.put_nowait(d)
