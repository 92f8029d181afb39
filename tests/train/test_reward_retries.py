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


class Hanging:
    name = "hanging"

    def __init__(self) -> None:
        self.calls, self.release = 0, __import__("threading").Event()

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        self.release.wait(30)
        return {"reward": torch.ones(len(prompts))}


def test_a_hanging_reward_stops_within_its_limit_with_one_line(sleeps):
    import time

    reward = Hanging()
    start = time.monotonic()
    with pytest.raises(faults.RewardTimeout) as info:
        RetryingReward(reward, retries=3, wait_s=1.0, timeout_s=0.5)(None, ["p"], [{}])
    took = time.monotonic() - start
    reward.release.set()
    assert 0.5 <= took < 2.0 and reward.calls == 1 and sleeps == []  # a hung call is not retried
    assert str(info.value) == ("reward 'hanging' did not return within reward.timeout_s=0.5 s (a hung reward model, "
                               "server or plug-in); the run stops (a hung call is not retried)")


def test_a_time_limited_call_is_the_call_itself(sleeps):
    """On the limit's thread: the caller's grad mode and CPU thread count, the reward's result, its errors (retried
    or not) as they were; one thread serves call after call."""
    import threading

    seen = []

    def probe(images, prompts, metadata):
        seen.append((torch.is_grad_enabled(), threading.current_thread().name, torch.get_num_threads()))
        return {"reward": torch.full((len(prompts),), 2.0)}

    probe.name = "probe"
    limited = RetryingReward(probe, retries=0, timeout_s=5.0)
    threads = torch.get_num_threads()
    with torch.no_grad():
        assert torch.equal(limited(None, ["a", "b"], [{}, {}])["reward"], torch.full((2,), 2.0))
    torch.set_num_threads(1 if threads != 1 else 2)  # put back by the autouse fixture
    limited(None, ["a"], [{}])
    assert seen == [(False, "reward-call", threads), (True, "reward-call", torch.get_num_threads())]
    assert len(limited._idle) == 1  # the same thread again
    flaky = Failing([ConnectionError("a")])
    assert torch.equal(RetryingReward(flaky, retries=1, wait_s=0.5, timeout_s=5.0)(None, ["p"], [{}])["reward"],
                       torch.ones(1))
    assert flaky.calls == 2 and sleeps == [0.5]
    error = ValueError("bad input")
    with pytest.raises(ValueError) as info:
        RetryingReward(Failing([error]), retries=3, timeout_s=5.0)(None, ["p"], [{}])
    assert info.value is error


def test_a_hanging_plugin_reward_stops_a_run_within_reward_timeout_s(tmp_path, capsys):
    """`awm-fast train` with a plug-in reward that never answers and reward.timeout_s=2: exit 1 with one line, soon
    after the first reward call (the step-0 evaluation)."""
    import time

    from awm_fast.cli import main
    from tests.rewards.user_rewards import HANG_CALLS
    from tests.train.test_faults import TINY

    from awm_fast.config import DigitsConfig
    from awm_fast.tasks.digits import prepare_digits

    prepare_digits(DigitsConfig())  # a cold cache prints its preparation: not part of this test
    capsys.readouterr()
    HANG_CALLS.clear()
    code = main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=hang", "train.steps=2",
                 "reward.name=tests.rewards.user_rewards:hang", "reward.timeout_s=2", "reward.retries=2"])
    took = time.monotonic() - HANG_CALLS[0]
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "reward.timeout_s=2 s" in err[0] and "tests.rewards.user_rewards:hang" in err[0]
    assert len(HANG_CALLS) == 1 and 2 <= took < 4, (HANG_CALLS, took)  # within the limit, never 3 x 2 s of retries


@pytest.mark.parametrize("value", ["0", "-1", ".inf", ".nan"])
def test_reward_timeout_s_must_be_a_positive_finite_number(value):
    from awm_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"reward.timeout_s=.*must be"):
        load_config("digits", [f"reward.timeout_s={value}"])
    assert load_config("digits", []).reward.timeout_s == 300.0
