"""Usage reporting: events wait in a bounded buffer and leave in batches
by HTTP, retried until Tally acknowledges them (Tally counts a request id
once, so a batch sent twice counts once). What is left at exit is sent
before the process ends."""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import threading
import time
from typing import Optional

from .client import Refused, Tally, Unreachable
from .config import Settings

log = logging.getLogger("tally_litellm")


class UsageSender:
    def __init__(self, tally: Tally, settings: Settings):
        self.tally = tally
        self.s = settings
        self._buf: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._task: Optional[asyncio.Task] = None
        self._wake: Optional[asyncio.Event] = None
        self._closing = False
        # Events per batch: the setting, halved while Tally answers 413.
        self._limit = settings.batch_max
        self.sent = 0
        self.rejected = 0
        atexit.register(self.flush_at_exit)

    def backlog(self) -> int:
        return len(self._buf)

    def full(self) -> bool:
        """Past the bound, new calls are refused (their usage would have
        nowhere to wait)."""
        return len(self._buf) >= self.s.buffer_max

    def add(self, event: dict) -> None:
        with self._lock:
            self._buf.append(event)
        if self._closing:
            # After the flush at exit began: send it now.
            self.flush_at_exit()
            return
        self._ensure_task()
        if self._wake is not None and len(self._buf) >= self.s.batch_max:
            self._wake.set()

    def _ensure_task(self) -> None:
        if self._task is not None and not self._task.done():
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if len(self._buf) < self.s.batch_max:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.s.flush_interval_s)
                except asyncio.TimeoutError:
                    pass
            if not self._buf:
                continue
            with self._lock:
                batch = [self._buf[i] for i in range(min(len(self._buf), self._limit))]
            try:
                answer = await self.tally.post_usage(batch)
            except Unreachable as e:
                log.warning("usage not sent, retrying in %.1f s (%d waiting): %s", backoff, len(self._buf), e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Refused as e:
                if e.status == 413 and len(batch) > 1:
                    # Larger than the server takes: smaller batches.
                    self._limit = max(1, len(batch) // 2)
                    log.warning("Tally takes at most %d events per batch here", self._limit)
                    continue
                # The whole batch is wrong (e.g. a revoked gateway token):
                # keep it and say so; an operator must act.
                log.error("Tally refused a usage batch (%d events kept): %s", len(batch), e)
                await asyncio.sleep(5.0)
                continue
            backoff = 0.1
            self._acknowledged(batch, answer)

    def _acknowledged(self, batch: list, answer: dict) -> None:
        with self._lock:
            for _ in batch:
                self._buf.popleft()
        self.sent += len(batch)
        for r in answer.get("rejected", []):
            self.rejected += 1
            i = r.get("index")
            ev = batch[i] if isinstance(i, int) and i < len(batch) else None
            log.error(
                "Tally rejected usage %s: %s %s",
                ev and ev.get("request_id"),
                r.get("code"),
                r.get("message"),
            )

    def flush_at_exit(self) -> None:
        """Sends what is buffered, synchronously, within the shutdown
        bound."""
        self._closing = True
        deadline = time.monotonic() + self.s.shutdown_flush_s
        while self._buf and time.monotonic() < deadline:
            with self._lock:
                batch = [self._buf[i] for i in range(min(len(self._buf), self._limit))]
            try:
                answer = self.tally.post_usage_sync(batch, max(0.1, deadline - time.monotonic()))
            except (Unreachable, Refused) as e:
                log.error("usage not sent at exit (%d events): %s", len(self._buf), e)
                time.sleep(0.2)
                continue
            self._acknowledged(batch, answer)
        if self._buf:
            log.error("%d usage events could not be sent before exit", len(self._buf))
