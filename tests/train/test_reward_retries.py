"""RetryingReward (train/faults.py): the waits double from reward.retry_wait_s, which errors are retried (transient
ones) and which are not (bugs, bad input, out-of-memory, an interrupt), and what the warning and the final error
say."""
import logging
import types

import pytest
import torch

from awm_fast.train import faults
from awm_fast.train.faults import RetryingReward, RewardFailed


class Failing:
    name = "flaky"

    def __init__(self, errors) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {"reward": torch.ones(len(prompts))}


@pytest.fixture
def sleeps(monkeypatch):
    """The waits RetryingReward asks for (no real sleep)."""
    waited = []
    monkeypatch.setattr(faults, "time", types.SimpleNamespace(sleep=waited.append))
    return waited


def test_the_wait_doubles_from_retry_wait_s(sleeps, caplog):
    caplog.set_level(logging.INFO, logger="awm_fast")
    reward = Failing([ConnectionError("a"), TimeoutError("b"), OSError("c")])
    out = RetryingReward(reward, retries=3, wait_s=0.25)(None, ["p", "q"], [{}, {}])
    logs = [r.getMessage() for r in caplog.records]
    assert torch.equal(out["reward"], torch.ones(2)) and reward.calls == 4
    assert sleeps == [0.25, 0.5, 1.0]
    assert logs == ["[warn] reward 'flaky' failed (ConnectionError: a); retry 1/3 in 0.25 s",
                    "[warn] reward 'flaky' failed (TimeoutError: b); retry 2/3 in 0.5 s",
                    "[warn] reward 'flaky' failed (OSError: c); retry 3/3 in 1 s"]
    sleeps.clear()
    again = RetryingReward(Failing([RuntimeError("x")]), retries=3, wait_s=0.25)
    again(None, ["p"], [{}])
    assert sleeps == [0.25]  # each call starts from wait_s again


def test_the_last_failure_stops_naming_the_reward_and_its_first_line(sleeps, caplog):
    reward = Failing([RuntimeError("HTTP 503\nServer busy\ntrace..."), RuntimeError(""), KeyError("k")])
    with pytest.raises(RewardFailed) as info:
        RetryingReward(reward, retries=2, wait_s=1.0)(None, ["p"], [{}])
    assert reward.calls == 3 and sleeps == [1.0, 2.0]  # no wait after the last attempt
    assert str(info.value) == ("reward 'flaky' failed 3 times in a row, last error KeyError: 'k'; check the reward "
                               "model/server (reward.retries=2 retries)")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardFailed, match=r"failed 1 times in a row, last error RuntimeError: ;"):
        RetryingReward(Failing([RuntimeError("")]), retries=0, wait_s=1.0)(None, ["p"], [{}])
    assert sleeps == [1.0, 2.0]  # retries=0: never waits
    caplog.set_level(logging.INFO, logger="awm_fast")
    caplog.clear()
    RetryingReward(Failing([RuntimeError("HTTP 503\nServer busy")]), retries=1, wait_s=1.0)(None, ["p"], [{}])
    logs = [r.getMessage() for r in caplog.records]
    assert logs == ["[warn] reward 'flaky' failed (RuntimeError: HTTP 503); retry 1/1 in 1 s"]  # first line only


@pytest.mark.parametrize("error", [ValueError("images must be RGB"), TypeError("prompts must be str"),
                                   UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"),  # a ValueError
                                   torch.OutOfMemoryError("CUDA out of memory"), KeyboardInterrupt()],
                         ids=["value", "type", "unicode", "oom", "interrupt"])
def test_bugs_bad_input_oom_and_interrupts_are_not_retried(sleeps, error):
    reward = Failing([error])
    with pytest.raises(type(error)) as info:
        RetryingReward(reward, retries=5, wait_s=1.0)(None, ["p"], [{}])
    assert info.value is error and reward.calls == 1 and sleeps == []
