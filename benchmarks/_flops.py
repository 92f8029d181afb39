"""Model FLOPs of the phase benchmark's model, counted once on the meta device and cached in a file.

    forward_per_image  F_fwd     the formula of benchmarks/_models.py (forward_counted: FlopCounterMode, a check)
    backward_per_row   F_bwd     FlopCounterMode: forward + backward of the LoRA policy call - its forward
                                 (with the checkpointed blocks' recompute when the spec trains with checkpointing)
    train_per_image    T (3 F_fwd + F_bwd)      rollout_per_image  N F_fwd (x2 with CFG)
    end_to_end         rollout + train

The count runs on the meta device (benchmarks/_meta.py): no weights are allocated and nothing is computed, so it
costs seconds on any machine and never touches the GPU. The result is written to `<cache_dir>/<spec>.flops`
(JSON; a different spec or torch version recounts), so the stages of one device call (device.sh: every stage writes
into the same folder) count once.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from awm_fast.config import Config
from awm_fast.families.flux import flux_call
from awm_fast.models.policy import Conditioning
from awm_fast.models.routing import enable_checkpointing
from benchmarks import _meta
from benchmarks._models import ModelSpec, forward_flops, transformer_class
from benchmarks._official import PeftSwitchedPolicy

CACHE_SUFFIX = ".flops"  # not .json: `step_time.py --merge DIR/*.json` reads only the runs' own files


def cache_key(spec: ModelSpec) -> dict:
    return {"spec": json.loads(json.dumps(asdict(spec))), "torch": torch.__version__.split("+")[0]}


def count_model_flops(spec: ModelSpec) -> dict:
    """The FLOP counts of one image / one training row of `spec` (module docstring), on the meta device."""
    flux = spec.kind == "flux"
    with _meta.quiet_diffusers():
        base = _meta.meta_transformer(transformer_class(spec).__name__, spec.transformer).requires_grad_(False)
        model = _meta.meta_lora_model(transformer_class(spec).__name__, spec.transformer, rank=spec.lora_rank,
                                      alpha=2 * spec.lora_rank, targets=Config().model.lora_targets)
    if spec.gradient_checkpointing:
        enable_checkpointing(model)
    x = torch.randn(1, *spec.latent, device=_meta.META)
    t = torch.full((1,), 0.5, device=_meta.META)
    cfg = spec.transformer
    cond = Conditioning(torch.randn(1, spec.text_len, cfg["joint_attention_dim"], device=_meta.META),
                        torch.randn(1, cfg["pooled_projection_dim"], device=_meta.META))
    call = functools.partial(flux_call, guidance=spec.guidance) if flux else None
    base_policy = PeftSwitchedPolicy(base, None, None, spec.latent, _meta.POLICY_DEVICE, torch.float32, call=call)
    policy = PeftSwitchedPolicy(model, None, None, spec.latent, _meta.POLICY_DEVICE, torch.float32, call=call)
    fwd_counted = _meta.forward_flops(lambda: base_policy.routed_velocity(x, t, cond, None))
    lora = _meta.forward_backward_flops(lambda: policy.velocity(x, t, cond))
    fwd, bwd, T = forward_flops(spec), lora["backward"], spec.num_timesteps
    formula = ("F_fwd = 2 (embed + B double + B1 single + out)" if flux else
               "F_fwd = 2 (embed + B block + K dual + out)")
    recompute = " (F_bwd includes the checkpointed blocks' recompute)" if spec.gradient_checkpointing else ""
    return {"forward_per_image": fwd, "forward_counted": fwd_counted, "lora_forward_counted": lora["forward"],
            "backward_per_row_counted": bwd, "train_per_image": T * (3 * fwd + bwd),
            "rollout_per_image": spec.num_steps * fwd,
            "rollout_cfg_per_image": spec.num_steps * 2 * fwd if spec.uses_cfg else None,
            "end_to_end_per_image": spec.num_steps * fwd + T * (3 * fwd + bwd), "counted_on": "meta",
            "formula": f"{formula} [benchmarks/_models.py]; train = T (3 F_fwd + F_bwd){recompute}"
                       "; rollout = steps F_fwd (x2 with CFG); e2e = rollout + train; F_bwd counted by "
                       "FlopCounterMode on the meta device [benchmarks/_flops.py]"}


def model_flops(spec: ModelSpec, cache_dir: Path | None = None, log=print) -> dict:
    """`count_model_flops(spec)`, read from `<cache_dir>/<spec.name>.flops` when an earlier run of the same spec
    wrote it (written atomically after counting; no cache without `cache_dir`)."""
    path = None if cache_dir is None else Path(cache_dir) / f"{spec.name}{CACHE_SUFFIX}"
    key = cache_key(spec)
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}
        if saved.get("key") == key:
            log(f"[flops] {spec.name}: read from {path}")
            return saved["flops"]
    flops = count_model_flops(spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "flops": flops}, indent=1))
        os.replace(tmp, path)
    return flops
