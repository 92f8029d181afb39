"""run.eval_every: evaluations between steps, of the weights of that step (what `awm-fast eval` of that step's
checkpoint reproduces exactly), none repeated at the last step; and a reward failing once in a rollout is retried
with the config's reward.retries / reward.retry_wait_s, the run going on."""
import json
import logging
import types

import pytest
import torch

from awm_fast.cli import main
from awm_fast.config import load_config
from awm_fast.train import faults
from awm_fast.train.trainer import train
from tests.train.test_faults import TINY


@pytest.mark.slow  # 14-30 s on 2 shared cores (3 evaluations, 2 checkpoints, the end-of-run plots)
def test_eval_every_evaluates_each_steps_weights_and_a_flaky_reward_is_retried(tmp_path, monkeypatch, caplog):
    from awm_fast.rewards.digits import DigitsReward

    real, calls, waited = DigitsReward.__call__, [], []

    def once_down(self, images, prompts, metadata):
        calls.append(len(prompts))
        if calls.count(8) == 2 and len(prompts) == 8:  # step 2's rollout batch (evaluation batches: 10 prompts)
            calls.append("failed")
            raise ConnectionError("reward server went away")
        return real(self, images, prompts, metadata)

    monkeypatch.setattr(DigitsReward, "__call__", once_down)
    monkeypatch.setattr(faults, "time", types.SimpleNamespace(sleep=waited.append))
    caplog.set_level(logging.INFO, logger="awm_fast")
    cfg = load_config(None, TINY + [f"run.output_dir={tmp_path}", "run.name=r", "train.steps=2", "run.eval_every=1",
                                    "run.checkpoint_every=1", "run.keep_checkpoints=3", "reward.retries=1", "reward.retry_wait_s=0.25"])
    summary = json.loads(train(cfg).read_text())
    logs = [r.getMessage() for r in caplog.records]
    # evaluations at 0, 1 (raw, ema: every evaluation after a step, as the official eval()), 2 (raw, ema); rollouts
    # of steps 1 and 2 (failed once, then again)
    assert calls == [10, 8, 10, 10, 8, "failed", 8, 10, 10] and waited == [0.25]
    assert "[warn] reward 'digits' failed (ConnectionError: reward server went away); retry 1/1 in 0.25 s" in logs
    evals = [line.split(":")[0] for line in logs if line.startswith("[eval]")]
    assert evals == ["[eval] step 0 (raw weights)", "[eval] step 1 (raw weights)", "[eval] step 1 (ema weights)",
                     "[eval] step 2 (raw weights)", "[eval] step 2 (ema weights)"]  # the last step once: the final one
    run = tmp_path / "r"
    saved = torch.load(run / "checkpoints" / "step_000002" / "state.pt", weights_only=True)["evals"]
    assert [(e["step"], e["weights"]) for e in saved] == [(0, "raw"), (1, "raw"), (1, "ema")]
    metrics = lambda e: {k: v for k, v in e.items() if k not in ("step", "weights")}
    assert metrics(saved[0]) == summary["eval_before"]

    out = tmp_path / "ev"
    assert main(["eval", str(run), "--all-checkpoints", "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    # the evaluation at step 1 is of step 1's weights: same seeds, prompts, batches: exact
    assert results["r/step_000001"]["raw"] == metrics(saved[1])
    assert results["r/step_000002"]["raw"] == summary["eval_after"]
    assert len({json.dumps(e) for e in (metrics(saved[0]), metrics(saved[1]), summary["eval_after"])}) == 3  # moved
