"""A queue of run keys for the reconciler's worker threads, with client-go's workqueue semantics.

A key is queued at most once however many events ask for it (the "dirty" set), and is never
handed to two workers at once: a key asked for while a worker has it is queued again when that
worker is done. So a burst of events about one run costs one more pass, and a pass that is
waiting for a worker absorbs every event that arrives meanwhile. Keys can also be added after a
delay (a retry's backoff, a planner recheck); the sooner of two delays for one key wins.

Hand-written rather than taken from a library: controller-runtime's is Go, and kopf's own
per-object queues serialise handlers per Job or Pod, not per run.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from typing import Hashable


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[Hashable] = collections.deque()
        self._dirty: set[Hashable] = set()  # queued or to be queued again once done
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []  # (due, tie-breaker, key), a heap
        self._due: dict[Hashable, float] = {}  # key -> its soonest pending due time
        self._order = itertools.count()
        self._shut = False

    def add(self, key: Hashable) -> None:
        """Queue the key unless it is queued already; if a worker has it, once more after it."""
        with self._cond:
            if self._shut or key in self._dirty:
                return
            self._dirty.add(key)
            if key not in self._processing:
                self._queue.append(key)
                self._cond.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queue the key `delay` seconds from now, unless it is due sooner already."""
        due = time.monotonic() + delay
        with self._cond:
            if self._shut or self._due.get(key, float("inf")) <= due:
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, next(self._order), key))
            self._cond.notify()

    def get(self) -> Hashable | None:
        """The next key for a worker, which must call `done` with it; None once shut down."""
        with self._cond:
            while True:
                if self._shut:
                    return None
                self._release_due()
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                wait = self._delayed[0][0] - time.monotonic() if self._delayed else None
                self._cond.wait(wait)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._shut:
                self._queue.append(key)
                self._cond.notify()

    def shut_down(self) -> None:
        """Workers get None; nothing queued or delayed is kept."""
        with self._cond:
            self._shut = True
            self._queue.clear()
            self._dirty.clear()
            self._delayed.clear()
            self._due.clear()
            self._cond.notify_all()

    def pending(self) -> int:
        """Keys queued or delayed (what is left after a shut-down: nothing)."""
        with self._cond:
            return len(self._queue) + len(self._delayed)

    def _release_due(self) -> None:
        now = time.monotonic()
        while self._delayed and self._delayed[0][0] <= now:
            due, _, key = heapq.heappop(self._delayed)
            if self._due.get(key) != due:
                continue  # superseded by a sooner one
            del self._due[key]
            if key not in self._dirty:
                self._dirty.add(key)
                if key not in self._processing:
                    self._queue.append(key)
