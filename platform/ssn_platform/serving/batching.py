"""Continuous batching of inspections: a batch is formed when the model is free, from what is waiting then.

Why not `@serve.batch`: Ray Serve's batch queue (ray/serve/batching.py, Ray 2.60) forms the next batch as soon as
the first request of it arrives plus `batch_wait_timeout_s`, whether or not the model is still busy with the
previous one; `max_concurrent_batches` only makes the formed batches wait for their turn. A CPU model takes
35-200 ms per batch, so under load most batches held one or two images (mean batch 1.2 with 8 clients and 2.7 with
32 at `max_batch_size` 8, measured with bench/bench_serving.py), and the replica ran the model at its batch-1 speed.

`ContinuousBatcher` forms a batch only when the inference thread is free: it takes up to `max_batch_size` waiting
items at once. When fewer are waiting, it waits until the oldest has waited `wait_s` (or the batch is full), so an
idle replica adds at most `wait_s` to a lone request and a busy one runs full batches with no added wait (the items
queued while the previous batch ran are old enough). Up to `concurrency` batches run at a time, in `executor`
(which needs as many threads): with one, the next batch waits for the model; with two and one torch thread each,
a batch can start on the other core while the first still runs, which fills the gaps a single pipeline leaves
while answers travel back to their clients and their next requests arrive (bench/bench_serving.py).

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
        self,
        run: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        *,
        max_batch_size: int,
        wait_s: float,
        concurrency: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not wait_s >= 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._run, self._executor = run, executor
        self.max_batch_size, self.wait_s, self.concurrency = max_batch_size, wait_s, concurrency
        self._waiting: collections.deque[_Waiting] = collections.deque()
        self._arrival = asyncio.Event()
        self._free = asyncio.Event()  # set when a running batch ends
        self._running = 0
        self._task: asyncio.Task | None = None
        self._batches: set[asyncio.Task] = set()  # strong references to the running batches

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

    @property
    def running(self) -> int:
        """Batches in the executor now."""
        return self._running

    async def _drain(self) -> None:
        """Forms batches while items wait and a batch slot is free; ends when none is left (the next `submit` starts
        it again)."""
        loop = asyncio.get_running_loop()
        while self._waiting:
            if self._running >= self.concurrency:
                self._free.clear()
                await self._free.wait()
                continue
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
            self._running += 1
            task = loop.create_task(self._run_batch(batch))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            if self.concurrency == 1:
                await task  # one pipeline: the next batch is formed when this one is done
        self._task = None

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._run, [e.item for e in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except Exception as error:  # noqa: BLE001 - every caller of this batch gets it
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(error)
            return
        finally:
            self._running -= 1
            self._free.set()
        for entry, result in zip(batch, results):
            if not entry.future.done():
                entry.future.set_result(result)


__all__ = ["ContinuousBatcher"]
