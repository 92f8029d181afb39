"""Faults stop with one clear line: flaky rewards are retried then stop, repeated non-finite steps stop,
out-of-memory names the memory knobs; the step plan every rank draws is the same."""
import logging

import pytest
import torch

from awm_fast.config import ConfigError, load_config
from awm_fast.train.faults import NonFiniteGuard, NonFiniteSteps, RetryingReward, RewardFailed
from awm_fast.train.trainer import plan_step, train

TINY = ["run.tensorboard=false", "run.eval_every=0", "run.checkpoint_every=0", "run.device=cpu",
        "digits.eval_per_digit=1", "sample.eval_num_steps=4", "sample.num_steps=6", "sample.prompts_per_step=2",
        "sample.group_size=4", "sample.batch_size=8", "train.micro_batch=4", "train.num_timesteps=2"]


class Flaky:
    name = "flaky"

    def __init__(self, failures: int, exc=ConnectionError("server went away")) -> None:
        self.failures, self.exc, self.calls = failures, exc, 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return {"reward": torch.zeros(len(prompts))}


def test_a_flaky_reward_is_retried_then_stops_with_its_name(caplog):
    caplog.set_level(logging.INFO, logger="awm_fast")
    ok = RetryingReward(Flaky(2), retries=2, wait_s=0.0)
    assert ok(None, ["a"], [{}])["reward"].shape == (1,) and ok.reward.calls == 3 and len(caplog.records) == 2
    assert ok.name == "flaky"
    with pytest.raises(RewardFailed, match=r"reward 'flaky' failed 3 times in a row, last error ConnectionError: server"):
        RetryingReward(Flaky(3), retries=2, wait_s=0.0)(None, ["a"], [{}])
    bad_input = Flaky(5, ValueError("images must be RGB"))
    with pytest.raises(ValueError, match="RGB"):  # a bug or bad input: not retried
        RetryingReward(bad_input, retries=2, wait_s=0.0)(None, ["a"], [{}])
    assert bad_input.calls == 1


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch, caplog):
    import awm_fast.algorithms.update_loop as parts

    caplog.set_level(logging.INFO, logger="awm_fast")
    guard = NonFiniteGuard(2)
    guard.update(1, True)
    guard.update(2, False)  # a good step resets the count
    guard.update(3, True)
    with pytest.raises(NonFiniteSteps, match=r"2 steps in a row \(up to step 4\).*train.max_nonfinite_steps=2"):
        guard.update(4, True)
    assert [(r.levelno, r.getMessage()[:15]) for r in caplog.records] == [(logging.WARNING, "[warn] step 1: "),
                                                                          (logging.WARNING, "[warn] step 3: "),
                                                                          (logging.WARNING, "[warn] step 4: ")]

    seen = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def nan_norm(params, max_norm):
        seen["params"] = params
        real_clip(params, max_norm)
        return torch.tensor(float("nan"))

    monkeypatch.setattr(parts.torch.nn.utils, "clip_grad_norm_", nan_norm)
    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "run.name=nan", "train.steps=5",
                                    "train.max_nonfinite_steps=2"])
    with pytest.raises(NonFiniteSteps, match="up to step 2"):
        train(cfg)
    assert len((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()) == 2
    assert all(p.grad is None for p in seen["params"])


def test_out_of_memory_stops_with_the_memory_knobs(tmp_path, monkeypatch, capsys):
    from awm_fast.cli import main
    from awm_fast.algorithms.awm import AWM

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(AWM, "update", oom)
    code = main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=oom", "train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("awm-fast: error: out of memory on cpu during the update")
    for knob in ("train.micro_batch", "sample.batch_size", "train.gradient_checkpointing=true", "model.dtype=bfloat16"):
        assert knob in err[0]


def test_every_rank_draws_the_same_step_plan():
    prompts, groups = plan_step(10, 4, 6, seed=42, step=3)
    again = plan_step(10, 4, 6, seed=42, step=3)
    assert torch.equal(prompts, again[0]) and torch.equal(groups, again[1])
    assert sorted(groups.tolist()) == [g for g in range(4) for _ in range(6)]  # every group, group_size members
    for g in range(4):  # a group is one prompt
        assert len(set(prompts[groups == g].tolist())) == 1
    assert not torch.equal(groups, torch.arange(4).repeat_interleave(6))  # shuffled over the global batch
    assert not torch.equal(plan_step(10, 4, 6, seed=42, step=4)[1], groups)


def test_distributed_config_is_checked():
    with pytest.raises(ConfigError, match="run.dist_backend='mpi'"):
        load_config(None, ["run.dist_backend=mpi"])
    with pytest.raises(ConfigError, match="run.dist_timeout_s=0"):
        load_config(None, ["run.dist_timeout_s=0"])
    with pytest.raises(ConfigError, match="reward.retries=-1"):
        load_config(None, ["reward.retries=-1"])
