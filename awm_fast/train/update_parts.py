"""Pieces every update loop (AWM, Flow-GRPO, DiffusionNFT) shares: noisy training rows and the optimizer step."""
from __future__ import annotations

import math

import torch


def noisy_rows(x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """Rows for T times over B latents, timestep-major (row = k B + b), fresh eps per row:
    x_t = (1 - t) x0 + t eps. Returns (x_t, u = eps - x0, t per row)."""
    T, B = t.numel(), x0.shape[0]
    x0r = x0.repeat(T, *([1] * (x0.dim() - 1)))
    t_rows = t.to(x0.device, torch.float32).repeat_interleave(B)
    eps = torch.randn(x0r.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    tv = t_rows.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tv) * x0r + tv * eps, eps - x0r, t_rows


def finish_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                loss: float) -> dict[str, float]:
    """Clip, then step unless the loss or the gradient is non-finite (NaN never reaches the weights);
    always leaves the grads cleared."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    skipped = not (math.isfinite(grad_norm) and math.isfinite(loss))
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": grad_norm, "skipped": float(skipped)}
