"""AWM's two KL terms weighted separately as the official code does (train.kl_weighting = official kl_weight for
the reference term, train.kl_ema_weighting = kl_ema_weight for the EMA term); DiffusionNFT's flat decay start."""
import dataclasses

import pytest
import torch

from awm_fast.algorithms import get_algorithm
from awm_fast.config import Config, ConfigError, TrainConfig, load_config
from awm_fast.models.policy import Conditioning
from awm_fast.sampling.timesteps import time_grid
from awm_fast.families.digits import POOLED_DIM, TEXT_DIM
from tests.models.tiny_configs import tiny_lora_policy


def _loss(policy, kl, kl_ema, x0, cond, adv):
    cfg = Config(train=TrainConfig(micro_batch=x0.shape[0], num_timesteps=2, beta=0.3, ema_beta=0.7, kl_weighting=kl,
                                   kl_ema_weighting=kl_ema, shared_batch=False))
    loss, parts = get_algorithm(cfg).micro_batch_loss(policy, x0, cond, adv, time_grid(6, 3.0),
                                                      torch.Generator().manual_seed(5), backend="torch")
    return loss, parts


@pytest.mark.parametrize("kl,kl_ema", [("uniform", "elbo"), ("elbo", "uniform")])
def test_each_kl_term_has_its_own_weighting(gen, kl, kl_ema):
    policy = tiny_lora_policy(dtype=torch.float64)
    x0 = torch.randn(3, 1, 8, 8, generator=gen, dtype=torch.float64)
    cond = Conditioning(torch.randn(3, 2, TEXT_DIM, generator=gen, dtype=torch.float64),
                        torch.randn(3, POOLED_DIM, generator=gen, dtype=torch.float64))
    adv = torch.rand(3, generator=gen, dtype=torch.float64) * 2 - 1
    mixed, parts = _loss(policy, kl, kl_ema, x0, cond, adv)
    same_ref, ref_parts = _loss(policy, kl, kl, x0, cond, adv)  # both terms under the reference term's weighting
    _, ema_parts = _loss(policy, kl_ema, kl_ema, x0, cond, adv)  # both under the EMA term's
    assert mixed.requires_grad
    torch.testing.assert_close(parts["kl"], ref_parts["kl"])
    torch.testing.assert_close(parts["kl_ema"].double(), ema_parts["kl_ema"].double(), rtol=1e-6, atol=0)
    assert not torch.allclose(ref_parts["kl_ema"], ema_parts["kl_ema"], rtol=1e-3)  # the weightings differ here
    expected = same_ref - 0.7 * ref_parts["kl_ema"].double() + 0.7 * ema_parts["kl_ema"].double()
    torch.testing.assert_close(mixed.double(), expected.double(), rtol=1e-6, atol=1e-9)


def test_kl_ema_weighting_is_a_checked_choice():
    assert load_config(None, ["train.kl_ema_weighting=elbo"]).train.kl_ema_weighting == "elbo"
    with pytest.raises(ConfigError, match="train.kl_ema_weighting"):
        load_config(None, ["train.kl_ema_weighting=ELBO2"])


def test_nft_decay_type_2_is_flat_for_75_steps():
    """Official return_decay(step, 2): 0 while step < 75, then min((step - 75) 0.0075, 0.999)."""
    cfg = load_config(None, ["train.algorithm=nft", "nft.decay_flat=75", "nft.decay_rate=0.0075",
                             "nft.decay_cap=0.999"])
    algo = get_algorithm(cfg)
    rate, cap = algo.adapter_decay()

    def official(step):
        return 0.0 if step < 75 else min((step - 75) * 0.0075, 0.999)

    for step in (1, 40, 74, 75, 76, 100, 208, 209, 500):
        assert min(cap, rate * algo.decay_step(step)) == pytest.approx(official(step), abs=1e-12), step
    default = get_algorithm(dataclasses.replace(cfg, nft=dataclasses.replace(cfg.nft, decay_flat=0)))
    assert default.decay_step(10) == 10  # decay_type 1 (the default): min(0.001 step, 0.5)
    assert get_algorithm(load_config(None, [])).decay_step(10) == 10  # AWM's "ema" adapter: no flat start
    with pytest.raises(ConfigError, match="nft.decay_flat"):
        load_config(None, ["nft.decay_flat=-1"])
