"""The shared batch costs no more than the three calls: FLOPs of one training micro-batch (forward + backward)
counted by torch.utils.flop_counter.FlopCounterMode on the tiny SD3 and FLUX transformers, and its calls."""
import functools

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from awm_fast.config import ModelConfig
from awm_fast.families.flux import flux_call
from awm_fast.models.lora import POLICY, adapter_params
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.routing import enable_checkpointing
from awm_fast.models.shared_batch import separate_velocities, shared_velocities
from tests.models.tiny_configs import add_distinct_adapters
from tests.tolerances import tol

# the transformers of awm_fast.families.tiny's SD3 and FLUX pipelines (same shapes, built in memory)
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=40,
                pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
TINY_FLUX = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(4, 6, 6))
ROWS, TEXT = 4, 6  # a micro-batch of 2 images x 2 timesteps


def _policy(kind: str, gen: torch.Generator, checkpointing: bool) -> FlowPolicy:
    torch.manual_seed(0)
    model = (SD3Transformer2DModel(**TINY_SD3) if kind == "sd3" else FluxTransformer2DModel(**TINY_FLUX))
    model.requires_grad_(False)
    add_distinct_adapters(model, list(ModelConfig().lora_targets), gen)
    if checkpointing:
        enable_checkpointing(model)
    call = functools.partial(flux_call, guidance=3.5) if kind == "flux" else None
    return FlowPolicy(model, encode=None, decode=None, latent_shape=(16, 8, 8), device=torch.device("cpu"), call=call)


def _rows(kind: str, gen: torch.Generator):
    pooled = TINY_SD3["pooled_projection_dim"] if kind == "sd3" else TINY_FLUX["pooled_projection_dim"]
    return (torch.randn(ROWS, 16, 8, 8, generator=gen), torch.rand(ROWS, generator=gen),
            Conditioning(torch.randn(ROWS, TEXT, 32, generator=gen), torch.randn(ROWS, pooled, generator=gen)))


def _micro_batch(policy, fn, x, t, cond, need_ref, need_ema):
    """One micro-batch: the velocities, a loss that reads every one of them, its backward. Returns
    (FLOPs, transformer calls, v, v_ref, v_ema, LoRA gradients)."""
    params = list(adapter_params(policy.transformer, POLICY).values())
    for p in params:
        p.grad = None
    calls = []
    hook = policy.transformer.register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    counter = FlopCounterMode(display=False)
    try:
        with sdpa_kernel(SDPBackend.MATH), counter:  # attention as matmuls, which FlopCounterMode counts
            v, v_ref, v_ema = fn(policy, x, t, cond, need_ref, need_ema)
            frozen = sum(u for u in (v_ref, v_ema) if u is not None)
            (v * (v.detach() - frozen - x)).sum().backward()
    finally:
        hook.remove()
    return counter.get_total_flops(), calls, v.detach(), v_ref, v_ema, [p.grad.clone() for p in params]


@pytest.mark.parametrize("kind,checkpointing,need_ref,need_ema", [
    ("sd3", False, True, True), ("sd3", True, True, True), ("flux", True, True, True), ("flux", False, True, True),
    ("sd3", False, False, True), ("flux", True, True, False)])
def test_shared_batch_costs_at_most_the_three_calls(gen, kind, checkpointing, need_ref, need_ema):
    policy = _policy(kind, gen, checkpointing)
    x, t, cond = _rows(kind, gen)
    three = _micro_batch(policy, separate_velocities, x, t, cond, need_ref, need_ema)
    shared = _micro_batch(policy, shared_velocities, x, t, cond, need_ref, need_ema)
    print(f"{kind} checkpointing={checkpointing} ref={need_ref} ema={need_ema}: "
          f"shared {shared[0]} FLOPs, three calls {three[0]} FLOPs ({shared[0] / three[0]:.4f}x)")
    assert shared[0] <= three[0]
    assert three[1] == [False] * (need_ref + need_ema) + [True]  # the policy call last, with grad
    assert shared[1] == [False, True]  # one no-grad call for the frozen rows, then the policy call
    for a, b in zip(three[2:5], shared[2:5]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, **tol(torch.float32))
    for g1, g2 in zip(three[5], shared[5]):
        torch.testing.assert_close(g2, g1, **tol(torch.float32))
