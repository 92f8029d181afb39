"""The fast path: which of model.compile, train.shared_batch and sample.cuda_graphs a run on a device uses.

Each switch is true | false | auto (the default). `auto` means "on where it works":

    model.compile       on for a CUDA device
    train.shared_batch  on for a CUDA device with LoRA (train.finetune=lora: its [ref; ema] call routes adapters)
    sample.cuda_graphs  on for a CUDA device with LoRA, unless the model family cannot replay graphs (its
                        module's CUDA_GRAPHS_REFUSED says why, e.g. Z-Image) or model.compile_mode captures graphs
                        of its own (COMPILE_GRAPH_MODES)

and off on the CPU, so the CPU digits default (`make train`) keeps its eager path and its figures. true / false
are kept as given (config.validate refuses an explicit true that cannot work). model.attention_backend=auto is
the fastest backend present that passes its probe (models.attention).

At run time each piece that fails falls back with one log line naming it and the reason, and the run goes on:
a block class whose compile fails or hits the recompile limit runs eager (models.compile); a CUDA-graph capture
that fails leaves the no-grad calls eager (models.cuda_graphs); an attention backend that is missing or fails
its probe gives way to the next of models.attention.PREFERENCE.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

from awm_fast.config import AUTO, Config

SWITCHES = ("model.compile", "train.shared_batch", "sample.cuda_graphs")
COMPILE_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # model.compile_mode values that capture CUDA graphs


@dataclass(frozen=True)
class FastPath:
    """The resolved switches of a config on a device; `why_off`: switch -> why `auto` left it off."""

    compile: bool
    shared_batch: bool
    cuda_graphs: bool
    why_off: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: each switch on / off (with the reason auto gave)."""
        parts = []
        for key in SWITCHES:
            on = getattr(self, key.split(".")[1])
            parts.append(f"{key} {'on' if on else 'off'}" + (f" ({self.why_off[key]})" if key in self.why_off else ""))
        return ", ".join(parts)


def family_not_asked() -> str | None:
    """`family_refusal` of a caller that reads only .compile / .shared_batch: the family matters to cuda_graphs only."""
    return None


def _graphs_refused(cfg: Config, compile_on: bool, family_refusal: Callable[[], str | None]) -> str | None:
    """Why CUDA graphs cannot serve this config (None: they can)."""
    if cfg.train.finetune != "lora":
        return f"train.finetune={cfg.train.finetune} (graphs need LoRA routing, no FSDP collectives)"
    if compile_on and cfg.model.compile_mode in COMPILE_GRAPH_MODES:
        return f"model.compile_mode={cfg.model.compile_mode} captures CUDA graphs of its own"
    refused = family_refusal()
    return f"model.kind={cfg.model.kind}: {refused}" if refused else None


def fast_path(cfg: Config, device: torch.device | str, *, family_refusal: Callable[[], str | None]) -> FastPath:
    """The switches of `cfg` resolved for `device` (module docstring); nothing is built or run. `family_refusal()`:
    why model.kind's family cannot replay CUDA graphs, or None (asked only when auto needs it; the families
    package passes its module's CUDA_GRAPHS_REFUSED: awm_fast.families.fast_path)."""
    cuda = torch.device(device).type == "cuda"
    m, t, s = cfg.model, cfg.train, cfg.sample
    why_off: dict[str, str] = {}

    def resolve(key: str, value, refusal) -> bool:
        if value != AUTO:
            return bool(value)
        reason = "not a CUDA device" if not cuda else refusal()
        if reason:
            why_off[key] = reason
        return reason is None

    compile_on = resolve("model.compile", m.compile, lambda: None)
    shared = resolve("train.shared_batch", t.shared_batch,
                     lambda: None if t.finetune == "lora" else f"train.finetune={t.finetune} has no LoRA routing")
    graphs = resolve("sample.cuda_graphs", s.cuda_graphs, lambda: _graphs_refused(cfg, compile_on, family_refusal))
    return FastPath(compile_on, shared, graphs, why_off)


def resolve_fast_path(cfg: Config, device: torch.device | str, *, family_refusal: Callable[[], str | None]) -> Config:
    """A copy of `cfg` with the three switches true / false for `device` (no `auto` left)."""
    resolved, path = copy.deepcopy(cfg), fast_path(cfg, device, family_refusal=family_refusal)
    resolved.model.compile, resolved.train.shared_batch = path.compile, path.shared_batch
    resolved.sample.cuda_graphs = path.cuda_graphs
    return resolved
