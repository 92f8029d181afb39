"""What a run trains on: the policy, the reward and the prompt lists, built from the config."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
import torch

from awm_fast.config import Config
from awm_fast.families.load import load_policy
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.prompt_sets import resolve_prompt_files
from awm_fast.rewards import Reward, build_reward
from awm_fast.rewards.prompts import load_prompt_set

logger = logging.getLogger(__name__)


@dataclass
class Task:
    policy: FlowPolicy
    reward: Reward
    prompts: list[str]
    metadata: list[dict]
    eval_prompts: list[str]
    eval_metadata: list[dict]
    null_cond: Conditioning | None
    info: dict = field(default_factory=dict)


def build_task(cfg: Config, device: torch.device) -> Task:
    if cfg.model.kind == "digits":
        from awm_fast.families.digits import PROMPTS, load_digits_policy
        from awm_fast.tasks.digits import prepare_digits

        art = prepare_digits(cfg.digits)
        logger.info(f"[digits] classifier accuracy on the held-out split: {art.classifier_accuracy:.1%}")
        policy = load_digits_policy(cfg, device, art)
        reward = build_reward(cfg.reward.name, digits_classifier=art.classifier, weights=cfg.reward.weights,
                              **cfg.reward.options)
        eval_prompts = [p for _ in range(cfg.digits.eval_per_digit) for p in PROMPTS]
        return Task(policy, reward, list(PROMPTS), [{"digit": int(p)} for p in PROMPTS], eval_prompts,
                    [{"digit": int(p)} for p in eval_prompts], policy.encode([""]),
                    {"classifier_accuracy": art.classifier_accuracy})
    train_file, eval_file = resolve_prompt_files(cfg.sample.prompt_file,
                                                 cfg.sample.eval_prompt_file or cfg.sample.prompt_file)
    prompts, metadata = load_prompt_set(train_file)
    eval_prompts, eval_metadata = load_prompt_set(eval_file)
    reward = build_reward(cfg.reward.name, weights=cfg.reward.weights, **cfg.reward.options)
    n = cfg.sample.eval_prompts
    eval_prompts, eval_metadata = eval_prompts[:n], eval_metadata[:n]
    policy = load_policy(cfg, device, prompts=prompts + eval_prompts)
    return Task(policy, reward, prompts, metadata, eval_prompts, eval_metadata, policy.encode([""]))
