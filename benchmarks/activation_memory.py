"""Activation memory of a preset's training micro-batch, measured on the meta device (no GPU, no memory).

    python benchmarks/activation_memory.py                       # geneval_sd35m (the memory rows of docs/training.md)
    python benchmarks/activation_memory.py --config geneval_sd35l --out DIR

The policy call with grad of one training micro-batch (rows = train.micro_batch x train.num_timesteps: every
(timestep, sample) pair of the micro-batch in one call, as AWM.micro_batch_loss makes it) runs on the preset's real
architecture built on the meta device, in model.dtype with the preset's LoRA (rank, targets), under
`torch.autograd.graph.saved_tensors_hooks`: the bytes of every tensor autograd saves for the backward (each storage
once, the weights left out) are the activations that call holds until its backward, the part of the training peak
that grows with the micro-batch (benchmarks/_meta.py). Measured twice:

- fused attention (FlashAttention's op: saves q, k, v, the output and the log-sum-exp per head), what the fast
  path runs when a fused backend passes its probe;
- math attention (torch's decomposition: also saves the (S x S) attention weights of every head), what runs if
  every fused backend fails: the out-of-memory risk.

Counted, not measured, beside them: the weights (parameters x bytes of model.dtype), and the trained LoRA's float32
weights, gradients and AdamW moments (the "ema" adapter's weights too). Not included: the no-grad calls of the
micro-batch (the [reference; EMA] call keeps no activations: one block's temporaries at a time), the CUDA caching
allocator's fragmentation and the kernels' workspaces.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from awm_fast.config import load_config  # noqa: E402
from awm_fast.models.lora import POLICY, adapter_params  # noqa: E402
from awm_fast.models.policy import FlowPolicy  # noqa: E402
from awm_fast.models.routing import enable_checkpointing  # noqa: E402
from benchmarks import _families, _meta, family_flops  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
GIB = 2**30


def measure(preset: str) -> dict:
    """Saved activations (fused and math attention) of the preset's micro-batch policy call, and the counted
    weight / LoRA-optimizer bytes (module docstring)."""
    cfg = load_config(preset)
    dtype = getattr(torch, cfg.model.dtype)
    name, config = family_flops.architecture(cfg)
    rows = cfg.train.micro_batch * cfg.train.num_timesteps
    mc = _families.meta_call(cfg, name, config, family_flops.latent_shape(cfg), family_flops.text_len(cfg))
    with _meta.quiet_diffusers():
        model = _meta.meta_lora_model(name, config, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha,
                                      targets=cfg.model.lora_targets, dtype=dtype)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model)
    policy = FlowPolicy(model, None, None, mc.latent, _meta.POLICY_DEVICE, dtype, call=mc.call)
    x, t, cond = mc.inputs(rows)
    saved = {att: _meta.saved_activation_bytes(model, lambda: policy.velocity(x, t, cond), dtype=dtype, attention=att)
             for att in _meta.ATTENTION}
    lora = sum(p.numel() for p in adapter_params(model, POLICY).values())
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {"preset": preset, "model": cfg.model.path, "dtype": cfg.model.dtype, "rows": rows,
            "micro_batch": cfg.train.micro_batch, "num_timesteps": cfg.train.num_timesteps,
            "gradient_checkpointing": cfg.train.gradient_checkpointing, "saved_activations": saved,
            "weights_bytes": base * dtype.itemsize,
            # float32 LoRA: "default" weights, gradients, AdamW exp_avg + exp_avg_sq; the "ema" adapter's weights
            "lora_optimizer_bytes": lora * 4 * 5, "how": "saved activations: measured on the meta device "
            "(saved_tensors_hooks); weights and LoRA + AdamW: counted from the parameters"}


def markdown(r: dict) -> str:
    lines = [f"# Training memory of `{r['preset']}` ({r['model']}, {r['dtype']}): micro-batch {r['micro_batch']} x "
             f"{r['num_timesteps']} timesteps = {r['rows']}-row policy call with grad "
             "(`benchmarks/activation_memory.py`)", "",
             "| attention | saved activations (measured, meta) | largest saved tensor | + weights + LoRA/AdamW "
             "(counted) |", "|---|---|---|---|"]
    fixed = r["weights_bytes"] + r["lora_optimizer_bytes"]
    for att, s in r["saved_activations"].items():
        lines.append(f"| {att} | {s['bytes'] / GIB:.1f} GiB | {s['largest_bytes'] / GIB:.2f} GiB | "
                     f"{(s['bytes'] + fixed) / GIB:.1f} GiB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="geneval_sd35m", help="a preset name or config file")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    result = measure(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"activation_memory_{Path(args.config).stem}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result), end="")
    return result


if __name__ == "__main__":
    main()
