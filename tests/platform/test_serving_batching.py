"""Continuous batching of the inspection replicas (serving.batching): batches are formed when the model is free."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest


class GatedModel:
    """A batch function that records its batches and holds each one until the test releases it."""

    def __init__(self, fail_on: set[int] | None = None) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail_on = fail_on or set()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.release()
        self.release.acquire()
        if self.fail_on & set(items):
            raise ValueError(f"bad batch {items}")
        return [10 * item for item in items]


async def _started(model: GatedModel) -> None:
    await asyncio.get_running_loop().run_in_executor(None, model.started.acquire)


def _batcher(model, pool, **options):
    from ssn_platform.serving.batching import ContinuousBatcher  # the serving package imports Ray

    return ContinuousBatcher(model, pool, **{"max_batch_size": 8, "wait_s": 0.0, **options})


def test_requests_that_arrive_while_a_batch_runs_form_full_batches_in_arrival_order():
    async def scenario():
        model = GatedModel()
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(model, pool)
            first = asyncio.create_task(batcher.submit(0))
            await _started(model)  # the model is busy with [0]
            rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 20)]
            await asyncio.sleep(0)
            assert batcher.waiting == 19
            for _ in range(4):
                model.release.release()
            results = await asyncio.gather(first, *rest)
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[0], list(range(1, 9)), list(range(9, 17)), [17, 18, 19]]
    assert results == [10 * i for i in range(20)]


def test_a_lone_request_waits_for_company_only_while_the_model_is_idle():
    async def scenario():
        model = GatedModel()
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(model, pool, wait_s=30.0, max_batch_size=3)
            tasks = [asyncio.create_task(batcher.submit(0))]
            await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(batcher.submit(1)))
            await asyncio.sleep(0.01)
            assert model.batches == []  # waiting for the oldest's wait_s or a full batch
            tasks.append(asyncio.create_task(batcher.submit(2)))  # full: runs at once, not after 30 s
            await _started(model)
            model.release.release()
            return model.batches, await asyncio.gather(*tasks)

    batches, results = asyncio.run(asyncio.wait_for(scenario(), timeout=20))
    assert batches == [[0, 1, 2]] and results == [0, 10, 20]


def test_a_failing_batch_fails_its_own_callers_only_and_cancelled_callers_are_never_run():
    async def scenario():
        model = GatedModel(fail_on={1})
        with ThreadPoolExecutor(1) as pool:
            batcher = _batcher(model, pool, max_batch_size=2)
            first = asyncio.create_task(batcher.submit(0))
            await _started(model)
            second, gone, third = (asyncio.create_task(batcher.submit(i)) for i in (1, 7, 2))
            await asyncio.sleep(0)
            gone.cancel()  # its client disconnected while it waited
            await asyncio.sleep(0)
            model.release.release()
            assert await first == 0
            await _started(model)
            model.release.release()
            with pytest.raises(ValueError, match="bad batch"):
                await second
            await _started(model)
            model.release.release()
            return model.batches, await third

    batches, third = asyncio.run(asyncio.wait_for(scenario(), timeout=20))
    assert batches == [[0], [1], [2]] and third == 20


def test_the_batcher_refuses_settings_that_would_never_run_a_batch():
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError, match="max_batch_size"):
            _batcher(lambda items: items, pool, max_batch_size=0)
        with pytest.raises(ValueError, match="wait_s"):
            _batcher(lambda items: items, pool, wait_s=-1.0)
        with pytest.raises(ValueError, match="concurrency"):
            _batcher(lambda items: items, pool, concurrency=0)


def test_with_two_inference_threads_a_second_batch_starts_while_the_first_runs_and_no_third():
    """concurrency 2: while batch [0] is held, [1..8] starts at once on the other thread; what arrives while both
    are busy waits and forms the next full batch when one of them ends."""

    async def scenario():
        model = GatedModel()
        with ThreadPoolExecutor(2) as pool:
            batcher = _batcher(model, pool, concurrency=2)
            first = asyncio.create_task(batcher.submit(0))
            await _started(model)
            second = [asyncio.create_task(batcher.submit(i)) for i in range(1, 9)]
            await _started(model)  # the second batch runs although the first has not ended
            assert batcher.running == 2 and model.batches == [[0], list(range(1, 9))]
            rest = [asyncio.create_task(batcher.submit(i)) for i in range(9, 12)]
            await asyncio.sleep(0.05)
            assert batcher.waiting == 3 and len(model.batches) == 2  # no third batch while two run
            model.release.release()  # one of the two ends
            await _started(model)
            for _ in range(2):
                model.release.release()
            results = await asyncio.gather(first, *second, *rest)
        return model.batches, results

    batches, results = asyncio.run(asyncio.wait_for(scenario(), timeout=20))
    assert batches == [[0], list(range(1, 9)), [9, 10, 11]]
    assert results == [10 * i for i in range(12)]
