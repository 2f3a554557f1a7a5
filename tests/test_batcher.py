"""clfsys.batcher without Ray: who waits for whom, and what each caller gets back."""

import asyncio

import pytest

from clfsys.batcher import Batcher


class Model:
    """Doubles each item; records every batch it ran, and fails on a batch holding 'boom'."""

    def __init__(self):
        self.batches: list[list] = []

    def __call__(self, batch):
        self.batches.append(list(batch))
        if "boom" in batch:
            raise RuntimeError("model failed")
        return [2 * x for x in batch]


def test_a_lone_request_does_not_wait_for_the_batch_timeout():
    async def main():
        model = Model()
        batcher = Batcher(model, max_size=8, wait_s=600)
        assert await asyncio.wait_for(batcher.submit(21), 60) == 42
        assert await asyncio.wait_for(batcher.submit(1), 60) == 2
        return model.batches

    assert asyncio.run(main()) == [[21], [1]]


def test_announced_requests_join_one_batch_and_the_rest_split_by_max_size():
    async def main():
        model = Model()
        batcher = Batcher(model, max_size=2, wait_s=0.3)
        batcher.expect(3)  # three images started decoding

        async def late(x, delay):
            await asyncio.sleep(delay)
            return await batcher.submit(x)

        results = await asyncio.wait_for(asyncio.gather(late(1, 0), late(2, 0.05),
                                                        late(3, 0.1)), 60)
        return results, model.batches

    results, batches = asyncio.run(main())
    assert results == [2, 4, 6]
    assert batches == [[1, 2], [3]]


def test_after_a_burst_the_next_batch_waits_for_as_many_then_shrinks():
    async def main():
        model = Model()
        batcher = Batcher(model, max_size=8, wait_s=0.2)
        batcher.expect(3)
        await asyncio.gather(*(batcher.submit(x) for x in (1, 2, 3)))
        # A batch of 3 came before: a lone request waits for company, until the timeout.
        alone = asyncio.ensure_future(batcher.submit(4))
        await asyncio.sleep(0.05)
        assert not alone.done()
        assert await asyncio.wait_for(alone, 60) == 8
        batcher.wait_s = 600  # a batch of one came before: the next lone request runs at once
        assert await asyncio.wait_for(batcher.submit(5), 60) == 10
        return model.batches

    assert asyncio.run(main()) == [[1, 2, 3], [4], [5]]


def test_an_image_that_fails_to_decode_is_not_waited_for():
    async def main():
        batcher = Batcher(Model(), max_size=8, wait_s=600)
        batcher.expect(2)
        batcher.unexpect()  # the second image was not an image
        return await asyncio.wait_for(batcher.submit(7), 60)

    assert asyncio.run(main()) == 14


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on(caplog):
    async def main():
        model = Model()
        batcher = Batcher(model, max_size=8, wait_s=0.3)
        batcher.expect(2)
        failed = await asyncio.gather(batcher.submit("boom"), batcher.submit(1),
                                      return_exceptions=True)
        after = await asyncio.wait_for(batcher.submit(5), 60)
        return failed, after

    failed, after = asyncio.run(main())
    assert [str(e) for e in failed] == ["model failed", "model failed"]
    assert after == 10
    # The server's log holds the failure once, with its traceback.
    logged = [r for r in caplog.records if r.name == "clfsys.batcher"]
    assert len(logged) == 1 and logged[0].getMessage() == "the model failed on a batch of 2"
    assert logged[0].exc_info and str(logged[0].exc_info[1]) == "model failed"


def test_a_cancelled_request_is_left_out_of_its_batch():
    async def main():
        model = Model()
        batcher = Batcher(model, max_size=8, wait_s=600)
        batcher.expect(2)
        gone = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await asyncio.wait_for(batcher.submit(2), 60), model.batches

    assert asyncio.run(main()) == (4, [[2]])
