"""LoRA adapters on a diffusers transformer: "default" (trained) and "ema" (the KL anchor).

    ema adapter:    ema <- d ema + (1 - d) theta,  d = min(cap, rate * step)       (after each optimizer step)
    evaluation EMA: e   <- k e   + (1 - k) theta,  k = min((1 + n) / (10 + n), 0.99)  (n = 1, 2, ...: the
                    optimizer step just taken, as the official EMAModuleWrapper.step(global_step): first k = 2/11)
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from awm_fast.models.routing import EMA, POLICY, enable_routing

LORA_INITS = ("gaussian", "default")  # model.lora_init: peft's gaussian init of A, or its default (kaiming)


def add_adapters(transformer, *, rank: int, alpha: int, init: str, targets: list[str]) -> None:
    """Attach "default" and "ema" (a copy of "default"), make "default" active and trainable, and switch the
    LoRA layers to tensor routing (models.routing)."""
    from peft import LoraConfig  # here: importing awm_fast (e.g. `awm-fast --help`) does not load peft

    init_weights = "gaussian" if init == "gaussian" else True
    for name in (POLICY, EMA):
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_weights, target_modules=list(targets))
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter is being added: intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                transformer.add_adapter(config, adapter_name=name)
        except ValueError as exc:
            raise ValueError(f"cannot add LoRA on model.lora_targets={targets}: {exc}") from None
    copy_adapter(transformer, POLICY, EMA)
    transformer.set_adapter(POLICY)
    enable_routing(transformer)


def adapter_params(transformer, name: str) -> dict[str, torch.nn.Parameter]:
    """The LoRA parameters of one adapter, keyed by their name with the adapter name removed."""
    tag = f".{name}."
    return {n.replace(tag, "."): p for n, p in transformer.named_parameters() if tag in n and "lora_" in n}


def copy_adapter(transformer, src: str, dst: str) -> None:
    dst_params = adapter_params(transformer, dst)
    with torch.no_grad():
        for key, p in adapter_params(transformer, src).items():
            dst_params[key].copy_(p)


@torch.no_grad()
def update_ema_adapter(transformer, step: int, *, rate: float, cap: float) -> float:
    """ema <- d ema + (1 - d) theta with d = min(cap, rate * step); returns d."""
    decay = min(cap, rate * step)
    ema = adapter_params(transformer, EMA)
    for key, p in adapter_params(transformer, POLICY).items():
        ema[key].mul_(decay).add_(p.detach(), alpha=1 - decay)
    return decay


class EvalEMA:
    """Float32 shadow of the "default" adapter: decay min((1 + n) / (10 + n), 0.99) at its n-th update (n >= 1)."""

    def __init__(self, transformer) -> None:
        self.shadow = {k: p.detach().float().clone() for k, p in adapter_params(transformer, POLICY).items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, transformer) -> float:
        self.updates += 1
        decay = min((1 + self.updates) / (10 + self.updates), 0.99)
        for key, p in adapter_params(transformer, POLICY).items():
            self.shadow[key].mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        return decay

    @contextlib.contextmanager
    def swapped_in(self, transformer):
        """Temporarily load the shadow weights into the "default" adapter."""
        params = adapter_params(transformer, POLICY)
        saved = {k: p.detach().clone() for k, p in params.items()}
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
        self.updates = int(state["updates"])
