"""Each setting's choices live with their owner; config reads them there, and imports neither diffusers nor peft."""
from __future__ import annotations

import subprocess
import sys

import pytest

from awm_fast.config import CHOICES, ConfigError, load_config


def test_config_imports_no_model_library():
    code = ("import sys, awm_fast.config; heavy = [m for m in ('diffusers', 'peft', 'transformers') if m in sys.modules];"
            " print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_choices_are_the_owners_lists():
    from awm_fast.families import MODEL_KINDS
    from awm_fast.models.attention import BACKENDS
    from awm_fast.models.compile import MODES
    from awm_fast.ops.awm_loss_torch import KL_WEIGHTINGS, RATIO_MODES, WEIGHTINGS
    from awm_fast.rewards import REWARDS
    from awm_fast.sampling.rollout import SAMPLERS
    from awm_fast.algorithms import ALGORITHMS
    from awm_fast.algorithms.nft import NFT_SAMPLERS

    owners = {"model.kind": MODEL_KINDS, "model.attention_backend": BACKENDS, "model.compile_mode": MODES,
              "train.weighting": WEIGHTINGS, "train.ratio_mode": RATIO_MODES, "train.kl_weighting": KL_WEIGHTINGS,
              "reward.name": tuple(REWARDS), "sample.sampler": SAMPLERS, "train.algorithm": tuple(ALGORITHMS),
              "nft.sampler": NFT_SAMPLERS}
    for dotted, owned in owners.items():
        assert tuple(CHOICES[dotted]) == tuple(owned), dotted
    for dotted, choices in CHOICES.items():
        assert len(choices) > 0 and all(isinstance(c, str) for c in choices), dotted


@pytest.mark.parametrize("override,listed", [("model.attention_backend=flash9", "sdpa_math"),
                                             ("train.algorithm=ppo", "flow_grpo"), ("model.kind=sdxl", "flux")])
def test_a_bad_choice_names_the_owners_list(override, listed):
    with pytest.raises(ConfigError, match=listed):
        load_config(None, [override])


def test_renamed_algorithm_keys_still_load(tmp_path):
    """The keys that moved into the flow_grpo / nft sections: the old names (older YAML files, the configs saved in
    older checkpoints) set the new keys, by override and in a file."""
    from awm_fast.config import RENAMED_KEYS, load_config

    cfg = load_config(None, ["train.grpo_beta=0.5", "train.nft_sampler=ode", "train.nft_decay_cap=0.25"])
    assert (cfg.flow_grpo.beta, cfg.nft.sampler, cfg.nft.decay_cap) == (0.5, "ode", 0.25)
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  algorithm: flow_grpo\n  grpo_sde_window: 2\n  grpo_optimizer_steps: 1\n"
                   "sample:\n  sampler: cps\n  noise_level: 0.8\n")
    cfg = load_config(str(old))
    assert (cfg.flow_grpo.sde_window, cfg.flow_grpo.optimizer_steps) == (2, 1)
    assert len(RENAMED_KEYS) == 10 and all(k.split(".")[0] == "train" for k in RENAMED_KEYS)
