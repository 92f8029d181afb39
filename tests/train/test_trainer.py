"""End-to-end runs of the digits task on CPU: learning, resume equality, bad rewards, NaN safety."""
import json
import shutil

import pytest
import torch

from awm_fast.config import load_config
from awm_fast.models.lora import POLICY, adapter_params
from awm_fast.train.trainer import train

TIMING = {"time_sample", "time_reward", "time_reward_wait", "time_train", "time_step", "images_per_s"}


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.tensorboard=false", "run.eval_every=0",
                              "digits.eval_per_digit=10", "run.device=cpu", *extra])  # cpu: exact equalities


@pytest.mark.slow
def test_short_run_raises_reward(tmp_path, capsys):
    from awm_fast.cli import main

    code = main(["train", f"run.output_dir={tmp_path}", "run.name=learn", "run.tensorboard=true",
                 "run.eval_every=0", "digits.eval_per_digit=10", "train.steps=40", "run.checkpoint_every=0",
                 "run.device=cpu"])  # thresholds tuned on CPU
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    summary_path = tmp_path / "learn" / "summary.json"
    assert last == f"summary: {summary_path}"
    summary = json.loads(summary_path.read_text())
    assert summary["eval_after"]["accuracy"] >= summary["eval_before"]["accuracy"] + 0.1
    rows = [json.loads(line) for line in (tmp_path / "learn" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    first = sum(r["reward_mean"] for r in rows[:8]) / 8
    final = sum(r["reward_mean"] for r in rows[-8:]) / 8
    assert final > first + 0.1
    for name in ("curves.png", "samples_before_after.png", "config.yaml"):
        assert (tmp_path / "learn" / name).stat().st_size > 0
    assert list((tmp_path / "learn" / "tensorboard").iterdir())
    assert summary["train_seconds"] > 0 and 0.9 < summary["classifier_accuracy"] <= 1


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    cfg = _cfg(tmp_path, "run.name=full", "train.steps=6", "run.checkpoint_every=3", "run.keep_checkpoints=3",
               "sample.prompts_per_step=4", "sample.batch_size=32", "train.micro_batch=16")
    full = json.loads(train(cfg).read_text())
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000006")
    resumed = json.loads(train(cfg, resume=str(tmp_path / "cut")).read_text())
    rows = lambda name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    a, b = rows("full"), rows("cut")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}
    assert full["eval_after"] == resumed["eval_after"] and full["eval_before"] == resumed["eval_before"]


def test_nan_reward_stops_with_a_clear_message_and_writes_no_checkpoint(tmp_path, monkeypatch):
    from awm_fast.rewards.digits import DigitsReward

    real = DigitsReward.__call__

    def broken(self, images, prompts, metadata):
        out = real(self, images, prompts, metadata)
        if len(prompts) != 100:  # evaluation batches pass; training rollouts get a NaN
            out["reward"][3] = float("nan")
        return out

    monkeypatch.setattr(DigitsReward, "__call__", broken)
    cfg = _cfg(tmp_path, "run.name=nan", "train.steps=2", "run.checkpoint_every=1")
    with pytest.raises(ValueError, match="reward 'digits' returned 1 non-finite values"):
        train(cfg)
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_non_finite_loss_never_reaches_the_weights(tmp_path):
    from awm_fast.sampling.timesteps import time_grid
    from awm_fast.algorithms.update_loop import MicroBatchRNG
    from awm_fast.train.task import build_task
    from tests.algorithms.updates import update_on

    cfg = _cfg(tmp_path)
    task = build_task(cfg, torch.device("cpu"))
    params = list(adapter_params(task.policy.transformer, POLICY).values())
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    latents = torch.randn(4, 1, 8, 8)
    latents[1, 0, 2, 2] = float("nan")
    cfg.train.micro_batch = 2
    stats = update_on(cfg, task.policy, latents, task.policy.encode(["1", "2", "3", "4"]), torch.ones(4),
                      time_grid(10, 3.0), MicroBatchRNG(0, 0), opt, params)
    assert stats.skipped == 1.0
    for p, q in zip(params, before):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_trainer_runs_on_the_fused_triton_ops(tmp_path, monkeypatch):
    """The same loop with every op forced to the Triton kernels (the interpreter on CPU)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("AWM_FAST_BACKEND", "triton")
    cfg = _cfg(tmp_path, "run.name=fused", "train.steps=2", "run.checkpoint_every=0", "sample.prompts_per_step=2",
               "sample.batch_size=16", "train.micro_batch=8", "sample.num_steps=6", "train.num_timesteps=2",
               "sample.eval_num_steps=4",
               "digits.eval_per_digit=2")
    summary = json.loads(train(cfg).read_text())
    rows = [json.loads(x) for x in (tmp_path / "fused" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 and r["grad_norm"] > 0 for r in rows)
    assert 0 <= summary["eval_after"]["accuracy"] <= 1
    # the same run on the torch ops: the same losses and gradients (fused kernels = the reference formulas)
    monkeypatch.setenv("AWM_FAST_BACKEND", "torch")
    cfg.run.name = "torch_ops"
    train(cfg)
    ref = [json.loads(x) for x in (tmp_path / "torch_ops" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "kl", "kl_ema", "grad_norm"):
        torch.testing.assert_close(torch.tensor([r[key] for r in rows]), torch.tensor([r[key] for r in ref]),
                                   rtol=1e-3, atol=1e-7)


@pytest.mark.slow
def test_two_rewards_with_weights_end_to_end(tmp_path):
    cfg = _cfg(tmp_path, "run.name=combo", "train.steps=2", "run.checkpoint_every=0",
               "reward.name=digits+jpeg_compressibility", "reward.weights=[1.0, 0.05]",
               "reward.options={jpeg_compressibility: {quality: 101}}", "sample.prompts_per_step=2",
               "sample.batch_size=16", "train.micro_batch=8", "digits.eval_per_digit=2")
    with pytest.raises(ValueError, match="quality=101"):  # options from the config reach the reward
        train(cfg)
    cfg.reward.options = {"jpeg_compressibility": {"quality": 90}}
    summary = json.loads(train(cfg).read_text())
    after = summary["eval_after"]
    assert {"digits", "jpeg_compressibility", "accuracy"} <= set(after)
    assert after["reward"] == pytest.approx(after["digits"] + 0.05 * after["jpeg_compressibility"], rel=1e-6)
    rows = [json.loads(x) for x in (tmp_path / "combo" / "metrics.jsonl").read_text().splitlines()]
    assert all("digits" in r and "jpeg_compressibility" in r for r in rows)
