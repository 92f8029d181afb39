"""Full fine-tuning (train.finetune=full): the adapter argument picks the trained, reference or EMA module, the
EMA copy moves by the EMA adapter's rule, and the LoRA-only options are refused."""
import pytest
import torch
from diffusers import SD3Transformer2DModel

from awm_fast.config import ConfigError, load_config
from awm_fast.models.adapt import make_full_models
from awm_fast.models.lora import EMA, POLICY
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.families.digits import tiny_transformer_config
from awm_fast.models.full_finetune import update_ema_model


@pytest.fixture
def policy():
    torch.manual_seed(0)
    base = SD3Transformer2DModel(**tiny_transformer_config()).requires_grad_(False)
    cfg = load_config(None, ["train.finetune=full", "train.eval_ema=false"])
    p = make_full_models(FlowPolicy(base, None, None, (1, 8, 8), torch.device("cpu")), cfg)
    with torch.no_grad():
        for w in p.models[POLICY].parameters():
            w.add_(0.05 * torch.randn_like(w))
        for w in p.models[EMA].parameters():
            w.add_(0.05 * torch.randn_like(w))
    return p


def _inputs(rows=3):
    g = torch.Generator().manual_seed(1)
    cfg = tiny_transformer_config()
    x = torch.randn(rows, 1, 8, 8, generator=g)
    cond = Conditioning(torch.randn(rows, 4, cfg["joint_attention_dim"], generator=g),
                        torch.randn(rows, cfg["pooled_projection_dim"], generator=g))
    return x, torch.rand(rows, generator=g), cond


def test_models_are_three_copies_with_only_the_policy_trainable(policy):
    trained, ref, ema = policy.models[POLICY], policy.models[None], policy.models[EMA]
    assert policy.transformer is trained and len({id(trained), id(ref), id(ema)}) == 3
    assert all(p.requires_grad and p.dtype == torch.float32 for p in trained.parameters())
    assert not any(p.requires_grad for m in (ref, ema) for p in m.parameters())


@pytest.mark.parametrize("adapter", [POLICY, None, EMA])
def test_velocity_calls_the_module_of_the_adapter(policy, adapter):
    x, t, cond = _inputs()
    module = policy.models[adapter]
    want = module(hidden_states=x, encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled,
                  timestep=t * 1000, return_dict=False)[0]
    got = policy.velocity(x, t, cond, adapter)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    others = [a for a in (POLICY, None, EMA) if a != adapter]
    assert all((policy.velocity(x, t, cond, a) - got).abs().max() > 1e-4 for a in others)
    assert got.requires_grad == (adapter == POLICY)
    with pytest.raises(ValueError, match="adapter='old'"):
        policy.velocity(x, t, cond, "old")


def test_ema_copy_update_rule(policy):
    trained, ema = policy.models[POLICY], policy.models[EMA]
    before = {n: p.detach().clone() for n, p in ema.named_parameters()}
    theta = dict(trained.named_parameters())
    assert update_ema_model(ema, trained, 100, rate=0.001, cap=0.3) == pytest.approx(0.1)
    for n, p in ema.named_parameters():
        torch.testing.assert_close(p, 0.1 * before[n] + 0.9 * theta[n].detach())
    assert update_ema_model(ema, trained, 10**6, rate=0.001, cap=0.3) == pytest.approx(0.3)


@pytest.mark.parametrize("extra, key", [(["train.shared_batch=true"], "train.shared_batch"),
                                        ([], "train.eval_ema"),
                                        (["sample.cuda_graphs=true"], "sample.cuda_graphs")])
def test_lora_only_options_are_refused_in_one_line(extra, key):
    eval_ema = [] if key == "train.eval_ema" else ["train.eval_ema=false"]
    with pytest.raises(ConfigError, match=f"{key}=true needs train.finetune=lora"):
        load_config(None, ["train.finetune=full", *eval_ema, *extra])
