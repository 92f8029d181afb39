"""The real SD3 loading path on a tiny random-weight pipeline built and saved locally."""
import json

import pytest
import torch

from awm_fast.families.sd3 import load_pipeline
from awm_fast.families.tiny import build_tiny_sd3
from awm_fast.train.trainer import train
from tests.models.tiny_configs import assert_stock_pipeline_reproduces, tiny_model_config


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


def _cfg(tmp_path, model_path, *extra):
    prompts = ["a red cube", "two green balls", "a photo of a cat", 'the word "hi" on a sign']
    return tiny_model_config(tmp_path, "sd3", model_path, prompts, *extra)


@pytest.mark.slow
def test_trainer_runs_on_tiny_sd3_and_exports_loadable_lora(tmp_path, tiny_sd3, monkeypatch):
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, tiny_sd3, "train.lr=0.05", "train.shared_batch=true", "model.attention_backend=sdpa_flash",
               "model.compile=false",  # compile: tests/models/test_compile.py (the same transformer class)
               "reward.num_workers=1")
    summary = json.loads(train(cfg).read_text())
    assert set(summary["eval_before"]) >= {"reward", "jpeg_kb"} and summary["steps"] == 2
    rows = [json.loads(x) for x in (tmp_path / "sd3" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped"] == 0 for r in rows)
    assert len(list((tmp_path / "cache" / "prompt_embeds").rglob("*.pt"))) == 5  # 4 prompts + the empty one

    # The exported adapter loads with the stock diffusers pipeline and changes the output as in training.
    from awm_fast.families.load import load_policy

    cfg = _cfg(tmp_path, tiny_sd3)
    policy = load_policy(cfg, torch.device("cpu"), prompts=["a red cube"])
    from awm_fast.train.checkpoint import load_checkpoint, resolve_checkpoint

    load_checkpoint(resolve_checkpoint(tmp_path / "sd3"), policy.transformer)
    cond = policy.encode(["a red cube"])
    ours = policy.velocity(torch.ones(1, 16, 8, 8) * 0.3, torch.tensor([0.7]), cond)
    assert_stock_pipeline_reproduces(load_pipeline(str(tiny_sd3), torch.float32), tmp_path / "sd3", _velocity, ours,
                                     cond)


def _velocity(transformer, cond):
    with torch.no_grad():
        return transformer(hidden_states=torch.ones(1, 16, 8, 8) * 0.3, encoder_hidden_states=cond.embeds,
                           pooled_projections=cond.pooled, timestep=torch.tensor([700.0]), return_dict=False)[0]


def test_unknown_prompt_after_release_is_a_clear_error(tmp_path, tiny_sd3, monkeypatch):
    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    from awm_fast.families.load import load_policy

    policy = load_policy(_cfg(tmp_path, tiny_sd3), torch.device("cpu"), prompts=["a red cube"])
    with pytest.raises(ValueError, match="was not encoded up front"):
        policy.encode(["something new"])


def test_policy_grid_is_the_pipeline_schedulers(tmp_path, tiny_sd3, monkeypatch):
    """Rollout, evaluation and the training strata use the loaded scheduler's sigmas (static shift 3)."""
    from awm_fast.sampling.timesteps import scheduler_grid, sd3_grid
    from awm_fast.families.load import load_policy

    monkeypatch.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
    policy = load_policy(_cfg(tmp_path, tiny_sd3), torch.device("cpu"), prompts=["a red cube"])
    scheduler = load_pipeline(str(tiny_sd3), torch.float32).scheduler
    for n in (10, 14, 40):
        assert torch.equal(policy.time_grid(n), scheduler_grid(scheduler, n))
        torch.testing.assert_close(policy.time_grid(n), sd3_grid(n, 3.0), atol=1e-7, rtol=0)
