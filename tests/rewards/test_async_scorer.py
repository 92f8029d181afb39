"""The thread-pool scorer: results in submission order, scoring overlapping the caller's work, timings, errors."""
import time

import pytest
import torch

from awm_fast.rewards import load_reward
from awm_fast.rewards.async_scorer import AsyncRewardScorer

PATH = "tests.rewards.user_rewards"


def submit_batches(scorer, count, sample_s=0.0):
    for k in range(count):
        time.sleep(sample_s)  # "sampling" batch k while earlier batches are scored
        scorer.submit(torch.zeros(2, 3, 4, 4), ["a", "b"], [{"batch": k}, {"batch": k}])


def test_results_in_order_and_parallel_workers():
    reward = load_reward(f"{PATH}:Sleepy", seconds=0.25)
    with AsyncRewardScorer(reward, num_workers=4) as scorer:
        t0 = time.perf_counter()
        submit_batches(scorer, 4)
        outs = scorer.gather()
        wall = time.perf_counter() - t0
    assert [o["reward"].tolist() for o in outs] == [[k, k] for k in range(4)]
    assert all(o["reward"].dtype == torch.float64 for o in outs)
    assert wall < 0.75, wall  # 4 x 0.25 s of sleeps ran concurrently
    assert scorer.gather() == []


def test_scoring_overlaps_sampling_and_records_waits():
    reward = load_reward(f"{PATH}:Sleepy", seconds=0.2)
    scorer = AsyncRewardScorer(reward, num_workers=1)
    t0 = time.perf_counter()
    submit_batches(scorer, 4, sample_s=0.2)
    outs = scorer.gather()
    wall = time.perf_counter() - t0
    scorer.close()
    assert [o["reward"][0].item() for o in outs] == [0, 1, 2, 3]
    assert wall < 1.4, wall  # serial: 4 x (0.2 sample + 0.2 score) = 1.6 s; overlapped: about 1.0 s
    assert [t.index for t in scorer.timings] == [0, 1, 2, 3]
    assert all(t.score_s >= 0.19 for t in scorer.timings)
    assert scorer.timings[-1].waited_s >= 0.1  # only the last batch is still being scored at gather time
    assert sum(t.waited_s for t in scorer.timings[:-1]) < 0.15
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
    import threading

    seen = []

    def reward(images, prompts, metadata):
        seen.append(threading.current_thread().name)
        return {"reward": torch.full((len(prompts),), float(metadata[0]["batch"]))}

    with AsyncRewardScorer(reward, num_workers=0) as scorer:
        submit_batches(scorer, 3)
        outs = scorer.gather()
    assert [o["reward"].tolist() for o in outs] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert seen == [threading.current_thread().name] * 3
    assert scorer.wait_time() < 0.01 and all(t.score_s >= 0 for t in scorer.timings)
    with AsyncRewardScorer(load_reward(f"{PATH}:wrong_length"), num_workers=0) as scorer:
        fut = scorer.submit(torch.zeros(3, 3, 4, 4), ["a", "b", "c"], [{}] * 3)  # errors surface at result time
        with pytest.raises(ValueError, match="1 scores for 3 images"):
            scorer.result(fut)
