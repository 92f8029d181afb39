"""The small training config the tiny SD3 / FLUX pipeline tests share (2 steps, 16 px, LoRA rank 4)."""
import contextlib

import torch

from awm_fast.config import Config, load_config

BARE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def add_distinct_adapters(model, targets, gen: torch.Generator, scale: float = 0.1):
    """Rank-4 (alpha 8) "default" and "ema" LoRA on `targets`, both moved by scale x N(0, 1) from `gen`: distinct,
    non-zero deltas, so policy, reference and EMA calls all differ. Returns the model."""
    from awm_fast.models.lora import EMA, POLICY, adapter_params, add_adapters

    add_adapters(model, rank=4, alpha=8, init="gaussian", targets=list(targets))
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in adapter_params(model, name).values():
                p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def tiny_lora_policy(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The digits transformer (seed 0) on `device` in `dtype` with distinct non-zero "default" and "ema" LoRA
    weights (rank 4, the bare target names: also attn2.* of its dual-attention block)."""
    from diffusers import SD3Transformer2DModel

    from awm_fast.models.lora import EMA, POLICY, adapter_params, add_adapters
    from awm_fast.models.policy import FlowPolicy
    from awm_fast.families.digits import tiny_transformer_config

    torch.manual_seed(0)
    model = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    add_adapters(model, rank=4, alpha=8, init="gaussian", targets=BARE_TARGETS)
    model.to(device, dtype)
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in adapter_params(model, name).values():
                p.add_(0.05 * torch.randn_like(p))
    return FlowPolicy(model, encode=None, decode=None, latent_shape=(1, 8, 8), device=torch.device(device), dtype=dtype)


def base_policy_at(tmp_path, cfg: Config, prompts: list[str]):
    """load_policy(cfg) on the CPU (fresh LoRA: the base model) with `prompts` encoded, its prompt cache under
    tmp_path/cache."""
    import pytest

    from awm_fast.families.load import load_policy

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWM_FAST_CACHE", str(tmp_path / "cache"))
        return load_policy(cfg, torch.device("cpu"), prompts=prompts)


def tiny_model_config(tmp_path, kind: str, model_path, prompts: list[str], *extra: str) -> Config:
    """A config for `kind` at `model_path` training on `prompts`; runs go to tmp_path/<kind>."""
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("".join(p + "\n" for p in prompts))
    return load_config(None, [
        f"model.kind={kind}", f"model.path={model_path}", "model.resolution=16", "model.lora_rank=4",
        "model.lora_alpha=8", "reward.name=jpeg_compressibility", f"sample.prompt_file={prompt_file}",
        "sample.prompts_per_step=2", "sample.group_size=2", "sample.batch_size=4", "sample.num_steps=4",
        "sample.eval_num_steps=4", "sample.eval_prompts=2", "train.micro_batch=2", "train.num_timesteps=2",
        "train.steps=2", "run.checkpoint_every=1", "run.tensorboard=false", f"run.output_dir={tmp_path}",
        f"run.name={kind}", "run.device=cpu", *extra])  # cpu: the tests compare velocities at float32 tolerances


@contextlib.contextmanager
def compiled_after_warm_up(transformer, calls):
    """calls(n, seed) -> list of tensors, eager; then the blocks compiled (aot_eager), the warm-up calls(3, 1) equal
    to eager; the block runs with recompiles forbidden and gets the eager outputs; the blocks are eager again after."""
    from awm_fast.models.compile import compile_blocks, uncompile_blocks
    from tests.tolerances import tol

    eager = calls(3, 1)
    compile_blocks(transformer, backend="aot_eager")
    try:
        for a, b in zip(calls(3, 1), eager):  # the warm-up
            torch.testing.assert_close(a, b, **tol(torch.float32))
        with torch.compiler.set_stance("fail_on_recompile"):
            yield eager
    finally:
        uncompile_blocks(transformer)


def assert_stock_pipeline_reproduces(pipe, run_dir, call, ours, *args) -> None:
    """The trained run's exported "default" LoRA (its last checkpoint under `run_dir`), loaded by the stock diffusers
    pipeline (`pipe.load_lora_weights`), gives the trained policy's velocity `ours` from `call(pipe.transformer,
    *args)`; the pipeline's transformer without it does not."""
    from awm_fast.models.lora import POLICY
    from awm_fast.train.checkpoint import resolve_checkpoint

    with torch.no_grad():
        base = call(pipe.transformer, *args)
        pipe.load_lora_weights(str(resolve_checkpoint(run_dir) / POLICY))
        theirs = call(pipe.transformer, *args)
    ours = ours.detach()
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-4)
