"""Continuous batching of inspections: a batch is formed when the model is free, from what is waiting then.

Why not `@serve.batch`: Ray Serve's batch queue (ray/serve/batching.py, Ray 2.60) forms the next batch as soon as
the first request of it arrives plus `batch_wait_timeout_s`, whether or not the model is still busy with the
previous one; `max_concurrent_batches` only makes the formed batches wait for their turn. A CPU model takes
35-200 ms per batch, so under load most batches held one or two images (mean batch 1.2 with 8 clients and 2.7 with
32 at `max_batch_size` 8, measured with bench/bench_serving.py), and the replica ran the model at its batch-1 speed.

`ContinuousBatcher` forms a batch only when the inference thread is free: it takes up to `max_batch_size` waiting
items at once. When fewer are waiting, it waits until the oldest has waited `wait_s` (or the batch is full), so an
idle replica adds at most `wait_s` to a lone request and a busy one runs full batches with no added wait (the items
queued while the previous batch ran are old enough). One batch runs at a time, in `executor`.

`run` takes a list of items and returns one result per item (an exception instance for an item that failed alone);
an exception raised by `run` fails every item of that batch. Items whose caller went away (a cancelled future) are
dropped before they are run. Runs on one event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class ContinuousBatcher:
    """See the module docstring."""

    def __init__(
        self, run: Callable[[list[Any]], Sequence[Any]], executor: Executor, *, max_batch_size: int, wait_s: float
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not wait_s >= 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self._run, self._executor = run, executor
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._arrival = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def submit(self, item: Any) -> Any:
        """The result of `item`, scored in the next batch that has room for it."""
        loop = asyncio.get_running_loop()
        entry = _Waiting(item, loop.create_future())
        self._waiting.append(entry)
        self._arrival.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await entry.future

    async def _drain(self) -> None:
        """Runs batches while items wait; ends when none is left (the next `submit` starts it again)."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            delay = self._waiting[0].arrived + self.wait_s - time.monotonic()
            if len(self._waiting) < self.max_batch_size and delay > 0:
                self._arrival.clear()
                try:  # woken by each arrival (the batch may be full now) or when the oldest has waited wait_s
                    await asyncio.wait_for(self._arrival.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                continue
            batch = [self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))]
            batch = [entry for entry in batch if not entry.future.done()]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._run, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # noqa: BLE001 - every caller of this batch gets it
                for entry in batch:
                    if not entry.future.done():
                        entry.future.set_exception(error)
                continue
            for entry, result in zip(batch, results):
                if not entry.future.done():
                    entry.future.set_result(result)
        self._task = None


__all__ = ["ContinuousBatcher"]
