"""Merged LoRA (models.merged_lora): the no-grad calls (rollout, [reference; ema]) run the base GEMM only, on
weight copies with the adapter merged in. Their FLOPs are the base model's, their outputs the unmerged calls'
within rounding, and a copy is rebuilt after each change of its adapter (optimizer step, EMA update), a stale
copy never used."""
import copy
import functools

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from awm_fast.config import ConfigError, ModelConfig, load_config
from awm_fast.families.flux import flux_call
from awm_fast.models.lora import EMA, POLICY, adapter_params, update_ema_adapter
from awm_fast.models.merged_lora import MergedLora
from awm_fast.models.policy import FlowPolicy
from awm_fast.models.routing import MERGED
from awm_fast.models.shared_batch import frozen_velocities
from tests.models.test_shared_batch_flops import TINY_FLUX, TINY_SD3, _rows
from tests.models.tiny_configs import add_distinct_adapters
from tests.tolerances import MERGED_LORA, tol

KINDS = ["sd3", "flux"]


def _base(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**TINY_SD3) if kind == "sd3" else FluxTransformer2DModel(**TINY_FLUX)
    return model.requires_grad_(False).to(dtype)


def _policies(kind: str, dtype=torch.float32):
    """(unmerged policy, merged policy, the stock base transformer): the same weights and distinct adapters."""
    base = _base(kind, dtype)
    model = add_distinct_adapters(copy.deepcopy(base), list(ModelConfig().lora_targets), torch.Generator().manual_seed(1))
    for name, p in model.named_parameters():  # LoRA in float32, as models.adapt makes it
        if "lora_" in name:
            p.data = p.data.float()
    call = functools.partial(flux_call, guidance=3.5) if kind == "flux" else None
    make = lambda m: FlowPolicy(m, encode=None, decode=None, latent_shape=(16, 8, 8), device=torch.device("cpu"),
                                dtype=dtype, call=call)
    unmerged, merged = make(model), make(copy.deepcopy(model))
    merged.merged = MergedLora(merged.transformer)
    return unmerged, merged, base


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", KINDS)
def test_merged_no_grad_calls_cost_the_base_model_flops(kind):
    unmerged, merged, base = _policies(kind)
    x, t, cond = _rows(kind, torch.Generator().manual_seed(2))
    stock = FlowPolicy(base, encode=None, decode=None, latent_shape=(16, 8, 8), device=torch.device("cpu"),
                              call=merged.call)
    base_rows = _flops(lambda: stock.forward(x, t, cond.embeds, cond.pooled, None))  # no LoRA layer at all
    with torch.no_grad():  # the merges (B A products, once per adapter change) happen here, outside the count
        merged.velocity(x, t, cond)
        merged.velocity(x, t, cond, adapter=EMA)
    assert _flops(lambda: merged.velocity(x, t, cond)) == base_rows  # the rollout call
    assert _flops(lambda: merged.velocity(x, t, cond, adapter=EMA)) == base_rows
    assert _flops(lambda: frozen_velocities(merged, x, t, cond, True, True)) == 2 * base_rows  # [ref; ema]
    assert _flops(lambda: unmerged.velocity(x, t, cond)) > base_rows  # the count resolves the LoRA product
    assert merged.merged.merges == {POLICY: 1, EMA: 1}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_outputs_equal_the_unmerged_calls(kind, dtype):
    """float32: equal at float32 tolerance; bf16: within bf16 rounding (W + s B A rounded once to bf16), the
    bound (tests/tolerances.py, MERGED_LORA) well below the adapters' effect."""
    unmerged, merged, _ = _policies(kind, dtype)
    x, t, cond = _rows(kind, torch.Generator().manual_seed(3))
    rel = lambda a, b: float((a.double() - b.double()).norm() / b.double().norm())
    bound = MERGED_LORA[dtype]
    with torch.no_grad():
        for adapter in (POLICY, EMA, None):
            ours, theirs = merged.velocity(x, t, cond, adapter), unmerged.velocity(x, t, cond, adapter)
            assert rel(ours, theirs) < bound, (adapter, rel(ours, theirs))
        ref, ema = frozen_velocities(merged, x, t, cond, True, True)
        ref_u, ema_u = frozen_velocities(unmerged, x, t, cond, True, True)
        assert rel(ref, ref_u) < bound and rel(ema, ema_u) < bound
        assert rel(unmerged.velocity(x, t, cond), ref_u) > 5 * bound  # the adapters move the output
    if dtype == torch.float32:
        torch.testing.assert_close(ema, ema_u, **tol(torch.float32))


def test_copy_is_refreshed_after_every_optimizer_step_and_a_stale_copy_is_caught():
    unmerged, merged, _ = _policies("sd3")
    x, t, cond = _rows("sd3", torch.Generator().manual_seed(4))
    params = list(adapter_params(merged.transformer, POLICY).values())
    params_u = list(adapter_params(unmerged.transformer, POLICY).values())
    optimizers = [torch.optim.AdamW(ps, lr=1e-2, foreach=True) for ps in (params, params_u)]
    with torch.no_grad():
        merged.velocity(x, t, cond)
        merged.velocity(x, t, cond, adapter=EMA)
    assert merged.merged.merges == {POLICY: 1, EMA: 1}
    for step in range(1, 3):
        for policy, optimizer in zip((merged, unmerged), optimizers):
            policy.velocity(x, t, cond).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert merged.merged.stale(POLICY) and not merged.merged.stale(EMA)
        with torch.no_grad(), pytest.raises(ValueError, match="stale"):  # the copy is never used stale
            merged.forward(x, t, cond.embeds, cond.pooled, merged._masks[(POLICY, x.shape[0], x.device)])
        with torch.no_grad():
            ours, theirs = merged.velocity(x, t, cond), unmerged.velocity(x, t, cond)  # re-merges "default"
        assert merged.merged.merges[POLICY] == 1 + step and not merged.merged.stale(POLICY)
        torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    layer = merged.merged.layers[0]
    before = getattr(layer, MERGED[EMA]).clone()
    update_ema_adapter(merged.transformer, 1000, rate=0.001, cap=0.3)  # the EMA moves: its copy is stale
    assert merged.merged.stale(EMA)
    with torch.no_grad():
        frozen_velocities(merged, x, t, cond, True, True)
    assert merged.merged.merges[EMA] == 2 and not torch.equal(getattr(layer, MERGED[EMA]), before)


def test_merged_lora_refusals(tmp_path):
    with pytest.raises(ConfigError, match="model.fp8"):
        load_config(None, ["model.merged_lora=true", "model.fp8=true", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match="train.finetune"):
        load_config(None, ["model.merged_lora=true", "train.finetune=full", "train.eval_ema=false"])
    with pytest.raises(ValueError, match="no routed LoRA layer"):
        MergedLora(_base("sd3"))


@pytest.mark.slow
def test_merged_calls_compile_once_and_follow_the_adapters():
    """Regional compile (aot_eager) with merged copies: the merged calls equal eager ones, and after the warm-up
    an adapter change (re-merged in place) and other batch sizes recompile nothing."""
    from tests.models.tiny_configs import compiled_after_warm_up
    from tests.models.test_compile import _policy, _rows as digit_rows

    policy = _policy(num_layers=1)  # the block kinds: test_compile.py
    policy.merged = MergedLora(policy.transformer)

    def calls(n, seed):
        x, t, cond = digit_rows(n, seed)
        with torch.no_grad():
            return [policy.velocity(x, t, cond), *frozen_velocities(policy, x, t, cond, True, True)]

    with compiled_after_warm_up(policy.transformer, calls) as eager:
        calls(5, 2)
        with torch.no_grad():
            for p in adapter_params(policy.transformer, POLICY).values():
                p.add_(0.1 * torch.randn_like(p))  # as an optimizer step
        after = calls(3, 1)
    assert not torch.equal(after[0], eager[0]) and torch.equal(after[2], eager[2])  # policy moved, EMA did not
    torch.testing.assert_close(after[0], calls(3, 1)[0], **tol(torch.float32))  # = the eager re-merged call
