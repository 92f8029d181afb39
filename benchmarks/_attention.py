"""The attention backend of the fast variants: the first of the priority list that RUNS, not merely imports.

`awm_fast.models.attention.resolve_attention_backend("auto")` picks the first backend whose package and device
are present; on a GPU no one has measured yet, a present backend can still fail on the model's head size or
dtype (cuDNN attention's backward, a flash build without sm_90). Here each candidate of
`awm_fast.models.attention.PREFERENCE` that is present runs one forward and backward at the model's head size,
dtype and token count (SD3: our processor's `attention`; FLUX: diffusers' `dispatch_attention_fn` with the name
`set_flux_attention` would give it), is compared with the math backend in float32,

    err = ||out - out_ref|| / ||out_ref||  <=  MAX_REL_ERR (bf16 / fp16 inputs),  gradients finite,

and the first that passes is used; the failures are logged (and kept by the smoke test), so a broken backend
falls back along the list instead of killing the run. `sdpa_math` is the last resort and is not probed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from awm_fast.models.attention import PREFERENCE, attention, backend_available

MAX_REL_ERR = 2e-2
PROBE_BATCH = 2
PROBE_TOKENS = 256  # at most: the failures probed for (head size, dtype, build) do not depend on the length


@dataclass
class AttentionChoice:
    """The backend chosen and, for each candidate tried before it, why it was passed over."""

    backend: str
    rejected: dict[str, str] = field(default_factory=dict)
    rel_err: float | None = None


def _diffusers_attention(q, k, v, backend: str):
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    from awm_fast.models.attention import DIFFUSERS_BACKENDS

    # diffusers' layout is (B, S, H, D)
    out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                backend=AttentionBackendName(DIFFUSERS_BACKENDS[backend]))
    return out.transpose(1, 2)


def probe_backend(backend: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, tokens: int,
                  flux: bool = False, seed: int = 0) -> float:
    """One forward + backward of `backend` on random (B, H, S, D) q, k, v; returns the relative error against the
    float32 math backend; raises ValueError when the output or a gradient is not finite or the error is too big."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (PROBE_BATCH, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) for _ in range(3))
    ins = [a.to(dtype).requires_grad_(True) for a in (q, k, v)]
    out = _diffusers_attention(*ins, backend) if flux else attention(*ins, backend)
    out.float().square().sum().backward()
    with torch.no_grad():
        ref = attention(q, k, v, "sdpa_math").double()
    err = float((out.detach().double() - ref).norm() / ref.norm())
    if not torch.isfinite(out).all() or any(a.grad is None or not torch.isfinite(a.grad).all() for a in ins):
        raise ValueError(f"{backend}: non-finite output, or a missing or non-finite gradient")
    if err > MAX_REL_ERR:
        raise ValueError(f"{backend}: relative error {err:.2e} against sdpa_math exceeds {MAX_REL_ERR:g}")
    return err


def working_attention_backend(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, tokens: int,
                              flux: bool = False, log=print) -> AttentionChoice:
    """The first backend of PREFERENCE (FLUX: without flash3, which has no backward there) that is present and
    passes `probe_backend`; sdpa_math when none does."""
    rejected: dict[str, str] = {}
    for name in PREFERENCE:
        if name == "sdpa_math":
            break
        if flux and name == "flash3":
            continue
        if not backend_available(name, device, dtype):
            continue
        try:
            err = probe_backend(name, device, dtype, heads, head_dim, min(tokens, PROBE_TOKENS), flux=flux)
        except Exception as exc:  # any failure of a candidate: try the next one
            rejected[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            log(f"[attention] {name} failed its probe ({rejected[name]}): trying the next backend")
            continue
        log(f"[attention] {name} ({device.type}, {str(dtype).removeprefix('torch.')}, head {head_dim}): "
            f"rel. error {err:.1e}" + (f"; passed over {', '.join(rejected)}" if rejected else ""))
        return AttentionChoice(name, rejected, err)
    log("[attention] every faster backend failed or is absent: sdpa_math")
    return AttentionChoice("sdpa_math", rejected)
