"""The thread-pool scorer: results in submission order, scoring overlapping the caller's work, timings, errors."""
import threading
from concurrent.futures import Future, wait

import pytest
import torch

from awm_fast.rewards import load_reward
from awm_fast.rewards.async_scorer import AsyncRewardScorer

PATH = "tests.rewards.user_rewards"


WAIT_S = 30.0  # an event that never comes fails the test after this long (no wall-clock threshold is asserted)


def submit_batches(scorer, count):
    return [scorer.submit(torch.zeros(2, 3, 4, 4), ["a", "b"], [{"batch": k}, {"batch": k}]) for k in range(count)]


class VirtualClock:
    """A clock for the scorer's timings that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_results_in_order_and_parallel_workers():
    """Each call waits at a 4-party barrier: the batch completes only if the 4 workers score at once."""
    meet = threading.Barrier(4, timeout=WAIT_S)
    threads = set()

    def reward(images, prompts, metadata):
        meet.wait()  # BrokenBarrierError (raised by gather) unless all 4 calls are running concurrently
        threads.add(threading.current_thread().name)
        return {"reward": torch.tensor([float(m["batch"]) for m in metadata])}

    with AsyncRewardScorer(reward, num_workers=4) as scorer:
        submit_batches(scorer, 4)
        outs = scorer.gather()
    assert [o["reward"].tolist() for o in outs] == [[k, k] for k in range(4)]
    assert all(o["reward"].dtype == torch.float64 for o in outs)
    assert len(threads) == 4  # 4 x 1 call ran concurrently, one per worker
    assert scorer.gather() == []


def test_scoring_overlaps_sampling_and_records_waits():
    """Batch k's reward returns only once the caller has sampled and submitted batch k + 1, so the run completes
    only if scoring overlaps sampling. On the virtual clock each sampling and each scoring takes 0.2 s, and the
    caller blocks 0.3 s on the last batch inside `gather`."""
    clock = VirtualClock()
    started = [threading.Event() for _ in range(4)]
    release = [threading.Event() for _ in range(4)]

    def reward(images, prompts, metadata):
        k = metadata[0]["batch"]
        started[k].set()
        if not release[k].wait(WAIT_S):
            raise TimeoutError(f"batch {k} was never released")
        return {"reward": torch.tensor([float(k)] * len(prompts))}

    scorer = AsyncRewardScorer(reward, num_workers=1, clock=clock)
    futs = []
    for k in range(4):
        clock.advance(0.2)  # the caller samples batch k while batch k - 1 is being scored
        futs.append(scorer.submit(torch.zeros(2, 3, 4, 4), ["a", "b"], [{"batch": k}, {"batch": k}]))
        if k:
            release[k - 1].set()
            assert wait(futs[k - 1:k], timeout=WAIT_S).done  # outside `result`: no waited_s
        assert started[k].wait(WAIT_S)  # batch k scores while the caller goes on to sample batch k + 1

    def blocked_on_the_last_batch():  # called by `result` after it read its start time: the caller now blocks
        clock.advance(0.3)
        release[3].set()
        return Future.result(futs[3])

    assert all(f.done() for f in futs[:3]) and not futs[3].done()
    futs[3].result = blocked_on_the_last_batch
    outs = scorer.gather()
    wall = clock()
    scorer.close()
    assert [o["reward"][0].item() for o in outs] == [0, 1, 2, 3]
    assert wall < 1.4, wall  # serial: 4 x (0.2 sample + 0.2 score) = 1.6 s; overlapped: 4 x 0.2 + 0.3 = 1.1 s
    assert wall == pytest.approx(1.1)
    assert [t.index for t in scorer.timings] == [0, 1, 2, 3]
    assert all(t.score_s >= 0.19 for t in scorer.timings)
    assert [t.score_s for t in scorer.timings] == pytest.approx([0.2, 0.2, 0.2, 0.3])
    assert [t.queued_s for t in scorer.timings] == pytest.approx([0.0] * 4)  # each starts as soon as submitted
    assert scorer.timings[-1].waited_s >= 0.1  # only the last batch is still being scored at gather time
    assert scorer.timings[-1].waited_s == pytest.approx(0.3)
    assert sum(t.waited_s for t in scorer.timings[:-1]) < 0.15
    assert [t.waited_s for t in scorer.timings[:-1]] == [0.0] * 3  # ready at gather time: no time blocked
    assert scorer.wait_time() == pytest.approx(sum(t.waited_s for t in scorer.timings))


def test_reward_errors_reach_the_caller():
    scorer = AsyncRewardScorer(load_reward(f"{PATH}:wrong_length"), num_workers=2)
    fut = scorer.submit(torch.zeros(3, 3, 4, 4), ["a", "b", "c"], [{}] * 3)
    with pytest.raises(ValueError, match="1 scores for 3 images"):
        scorer.result(fut)
    scorer.close()
    with pytest.raises(ValueError, match="num_workers"):  # 0 is the inline mode; negative is an error
        AsyncRewardScorer(load_reward("jpeg_compressibility"), num_workers=-1)


def test_inline_mode_scores_in_the_callers_thread_in_order():
    seen = []
    clock = VirtualClock()

    def reward(images, prompts, metadata):
        seen.append(threading.current_thread().name)
        clock.advance(0.1)  # the call takes 0.1 s on the virtual clock
        return {"reward": torch.full((len(prompts),), float(metadata[0]["batch"]))}

    with AsyncRewardScorer(reward, num_workers=0, clock=clock) as scorer:
        submit_batches(scorer, 3)
        outs = scorer.gather()
    assert [o["reward"].tolist() for o in outs] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert seen == [threading.current_thread().name] * 3
    assert scorer.wait_time() < 0.01 and all(t.score_s >= 0 for t in scorer.timings)
    assert scorer.wait_time() == 0.0  # scored inside submit: gather never blocks
    assert [t.score_s for t in scorer.timings] == pytest.approx([0.1] * 3)
    with AsyncRewardScorer(load_reward(f"{PATH}:wrong_length"), num_workers=0) as scorer:
        fut = scorer.submit(torch.zeros(3, 3, 4, 4), ["a", "b", "c"], [{}] * 3)  # errors surface at result time
        with pytest.raises(ValueError, match="1 scores for 3 images"):
            scorer.result(fut)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_batch_decoded_on_a_side_stream_is_scored_only_once_its_event_is_done(num_workers):
    """decode_on_side_stream hands the scorer the event its images are complete at; the scorer waits on it before
    the reward sees the images (a fake event here: CUDA streams need a GPU)."""
    from awm_fast.rewards.async_scorer import decode_on_side_stream

    order = []

    class Event:
        def synchronize(self):
            order.append("synchronize")

    def reward(images, prompts, metadata):
        order.append("reward")
        return {"reward": images.flatten(1).mean(1)}

    reward.name = "probe"
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with AsyncRewardScorer(reward, num_workers=num_workers) as scorer:
        scorer.submit(images, ["a", "b", "c"], [{}] * 3, ready=Event())
        (out,) = scorer.gather()
    assert order == ["synchronize", "reward"] and torch.allclose(out["reward"], images.flatten(1).mean(1).double())
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    decoded, ready = decode_on_side_stream(lambda x: x * 2, latents, overlap=True)  # CPU: inline, no event
    assert ready is None and torch.equal(decoded, latents * 2)
