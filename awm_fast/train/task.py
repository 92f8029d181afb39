"""What a run trains on: the policy, the reward and the prompt lists, built from the config."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from awm_fast.config import Config
from awm_fast.models.load import load_policy
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.rewards import Reward, build_reward


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


def read_prompt_file(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sample.prompt_file={path!r} does not exist")
    prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"sample.prompt_file={path!r} holds no prompts")
    return prompts


def build_task(cfg: Config, device: torch.device, log=print) -> Task:
    if cfg.model.kind == "digits":
        from awm_fast.tasks.digits import PROMPTS, prepare_digits

        art = prepare_digits(cfg.digits, log=log)
        log(f"[digits] classifier accuracy on the held-out split: {art.classifier_accuracy:.1%}")
        policy = load_policy(cfg, device, digits_artifacts=art)
        reward = build_reward(cfg.reward.name, digits_classifier=art.classifier)
        eval_prompts = [p for _ in range(cfg.digits.eval_per_digit) for p in PROMPTS]
        return Task(policy, reward, list(PROMPTS), [{"digit": int(p)} for p in PROMPTS], eval_prompts,
                    [{"digit": int(p)} for p in eval_prompts], policy.encode([""]),
                    {"classifier_accuracy": art.classifier_accuracy})
    prompts = read_prompt_file(cfg.sample.prompt_file)
    reward = build_reward(cfg.reward.name)
    eval_prompts = prompts[:cfg.sample.eval_prompts]
    policy = load_policy(cfg, device, prompts=prompts + eval_prompts)
    return Task(policy, reward, prompts, [{} for _ in prompts], eval_prompts, [{} for _ in eval_prompts],
                policy.encode([""]))
