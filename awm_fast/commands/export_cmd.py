"""`awm-fast export RUN|CKPT --out DIR [--weights raw|ema|both] [--merged] [--overwrite]`: the trained LoRA for use
outside awm-fast. --weights both writes DIR/raw/... and DIR/ema/..., each laid out as below. DIR must be empty or
absent (--overwrite removes what an earlier export wrote there: lora/, merged/, raw/, ema/, export.json).

    DIR/lora/pytorch_lora_weights.safetensors   the diffusers pipeline LoRA file (raw: the checkpoint's default/
        adapter as saved; ema: the evaluation EMA in the same format):
        `StableDiffusion3Pipeline / FluxPipeline.load_lora_weights("DIR/lora")`
    DIR/merged/   --merged: the LoRA fused into the base weights (diffusers fuse_lora, then the LoRA layers
        removed) and saved with save_pretrained: `DiffusionPipeline.from_pretrained("DIR/merged")` loads it
        without peft (model.kind=sd3/flux); components saved as null (a pipeline without T5) must be passed as
        None, as the printed load line and export.json's "load" say. Digits has no diffusers pipeline: DIR/merged/transformer is its
        merged SD3Transformer2DModel folder.

The merged weights are checked: on random latents, timesteps and two prompts, the merged transformer's velocity
must match the base + adapter velocity within --tolerance (max |difference| relative to max |v|; default per
model.dtype); the measured value is printed and written to DIR/export.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from awm_fast.logs import progress_bar

from awm_fast.commands.common import WEIGHTS, add_source_arguments, UsageError, split_positionals, build_policy, device_of, load_sources, load_weights, \
    weight_choices, weights_in

logger = logging.getLogger(__name__)

LORA_FILE = "pytorch_lora_weights.safetensors"
WRITTEN = ("lora", "merged", "raw", "ema", "export.json")  # what an export writes into --out
TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}  # relative max |diff| of the velocity


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint's LoRA file, optionally a merged pipeline folder",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(p, "export", base=False)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", default="raw", choices=WEIGHTS,
                   help="raw | ema (the evaluation EMA) | both (DIR/raw and DIR/ema); default raw")
    p.add_argument("--merged", action="store_true", help="also write the LoRA fused into the base model")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (its lora/, merged/, "
                                                            "raw/, ema/ and export.json; nothing else is touched)")
    p.add_argument("--tolerance", type=float, default=None, help="max relative velocity difference of the merged "
                                                                 "model (default per model.dtype)")


def write_lora(ckpt: Path, state: dict, policy, weights: str, folder: Path) -> Path:
    """The adapter file: a copy of the checkpoint's (raw), or the evaluation EMA with its metadata (ema)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from awm_fast.models.finetune import PREFIX
    from awm_fast.models.lora import POLICY

    folder.mkdir(parents=True, exist_ok=True)
    src = ckpt / POLICY / LORA_FILE
    if weights == "raw":
        shutil.copyfile(src, folder / LORA_FILE)
        return folder / LORA_FILE
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    shadow = state["eval_ema"]["shadow"]
    tensors = {PREFIX + k: v.detach().float().contiguous() for k, v in shadow.items()}
    if set(tensors) != keys:
        raise ValueError(f"checkpoint {ckpt}: the evaluation EMA's {len(tensors)} tensors do not match the adapter "
                         f"file's {len(keys)}")
    save_file(tensors, str(folder / LORA_FILE), metadata=metadata)
    return folder / LORA_FILE


def merge(cfg, lora_dir: Path, out: Path, art) -> Path:
    """Fuse the LoRA into the base weights and save them without LoRA layers; returns the folder to load."""
    from awm_fast.env import DTYPES

    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.kind == "digits":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(art.model_dir)
        model.load_lora_adapter(str(lora_dir), prefix="transformer", weight_name=LORA_FILE)
        model.fuse_lora()
        model.unload_lora()
        model.save_pretrained(out / "transformer")
        return out / "transformer"
    from awm_fast.families import pipeline_family

    pipe = pipeline_family(cfg.model.kind).load_pipeline(cfg.model.path, dtype)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(out)
    return out


def check_plain(folder: Path, kind: str) -> None:
    """The merged folder loads with DiffusionPipeline (or SD3Transformer2DModel) and holds no LoRA tensor."""
    if kind == "digits":
        from diffusers import SD3Transformer2DModel

        module = SD3Transformer2DModel.from_pretrained(folder)
    else:
        from diffusers import DiffusionPipeline

        from awm_fast.models.pipeline import from_pretrained

        module = from_pretrained(DiffusionPipeline, kind, str(folder), torch.float32).transformer
    lora = [n for n, _ in module.named_parameters() if "lora" in n]
    if lora or getattr(module, "peft_config", None):
        raise ValueError(f"merged model {folder} still has LoRA layers (e.g. {lora[:1]})")


def probe(policy, adapter):
    """The velocity on fixed random latents, timesteps and two prompts (float64 on CPU)."""
    prompts = ["3", "7"] if policy.latent_shape == (1, 8, 8) else ["a red cube", "two cats"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2, *policy.latent_shape), generator=g).to(policy.device)
    t = torch.tensor([0.3, 0.8], device=policy.device)
    with torch.no_grad():
        return policy.velocity(x, t, policy.encode(prompts), adapter).double().cpu()


def prepare_out(out: Path, overwrite: bool) -> None:
    """--out must be absent or empty; with --overwrite, an earlier export's entries (WRITTEN) are removed, and a
    folder holding anything else is refused: no stale merged/ is ever left beside new files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    present = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if present and not overwrite:
        raise UsageError(f"--out {out} is not empty ({', '.join(present[:4])}{', ...' if len(present) > 4 else ''}): "
                         "give a new folder, or --overwrite to replace an earlier export there")
    foreign = [name for name in present if name not in WRITTEN]
    if foreign:
        raise UsageError(f"--out {out} holds files an export did not write ({', '.join(foreign[:4])}): not "
                         "overwriting; give a new folder")
    for name in present:
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()


def load_line(folder: Path) -> str:
    """The Python line that loads the merged pipeline: components saved as null passed as None."""
    index = folder / "model_index.json"
    absent = [k for k, v in json.loads(index.read_text()).items() if v == [None, None]] if index.is_file() else []
    extra = "".join(f", {k}=None" for k in absent)
    return f'DiffusionPipeline.from_pretrained("{folder}"{extra})'


def run(args) -> int:
    paths, overrides = split_positionals(args.items)
    if len(paths) != 1:
        raise UsageError(f"give one run or checkpoint folder to export (got {len(paths)}: {' '.join(paths)})")
    (source,) = load_sources(paths, base=False, config=None, overrides=overrides)
    cfg = source.cfg
    if cfg.train.finetune == "full":
        raise UsageError(f"checkpoint {source.ckpt} is a train.finetune=full one: {source.ckpt}/default already "
                         "holds the whole trained transformer (SD3Transformer2DModel / FluxTransformer2DModel"
                         ".from_pretrained); there is no LoRA to export")
    out = Path(args.out)
    prepare_out(out, args.overwrite)
    probe_prompts = ["3", "7"] if cfg.model.kind == "digits" else ["a red cube", "two cats"]
    policy, _, art = build_policy(cfg, device_of(cfg), probe_prompts)
    state = load_weights(policy, source)
    chosen = weight_choices(state, args.weights)
    for weights in chosen:
        export_weights(args, source, policy, state, art, weights, out / weights if len(chosen) > 1 else out)
    return 0


def export_weights(args, source, policy, state, art, weights: str, out: Path) -> None:
    """One weight set's export into `out` (see the module docstring)."""
    from awm_fast.models.lora import POLICY

    cfg = source.cfg
    probe_prompts = ["3", "7"] if cfg.model.kind == "digits" else ["a red cube", "two cats"]
    stages = progress_bar(total=4 if args.merged else 1, desc=f"export ({weights})", unit="stage")
    lora = write_lora(source.ckpt, state, policy, weights, out / "lora")
    stages.update()
    info = {"checkpoint": str(source.ckpt), "weights": weights, "lora": str(lora)}
    logger.info(f"[export] LoRA ({weights} weights): {lora}")
    if args.merged:
        with weights_in(policy, state, weights):
            v_adapter = probe(policy, POLICY)
        v_base = probe(policy, None)
        merged = merge(cfg, out / "lora", out / "merged", art)
        stages.update()
        check_plain(merged, cfg.model.kind)
        stages.update()
        merged_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(merged)))
        if cfg.model.kind == "digits":
            from awm_fast.families.digits import load_digits_policy

            mp = load_digits_policy(merged_cfg, device_of(cfg), dataclasses.replace(art, model_dir=merged))
        else:
            mp, _, _ = build_policy(merged_cfg, device_of(cfg), probe_prompts)
        v_merged = probe(mp, None)  # the reference path: the merged base weights alone
        del mp
        stages.update()
        diff = float((v_merged - v_adapter).abs().max())
        rel = diff / max(float(v_adapter.abs().max()), 1e-12)
        tol = TOLERANCE[cfg.model.dtype] if args.tolerance is None else args.tolerance
        info.update(merged=str(out / "merged"), max_abs_diff=diff, max_rel_diff=rel, tolerance=tol,
                    adapter_effect=float((v_adapter - v_base).abs().max()))  # what the LoRA changes (base vs adapter)
        if cfg.model.kind != "digits":
            info["load"] = load_line(out / "merged")
        (out / "export.json").write_text(json.dumps(info, indent=2))
        logger.info(f"[export] merged model: {out / 'merged'}; velocity vs base + adapter: max |diff| {diff:.3g} "
                    f"({rel:.3g} of max |v|, tolerance {tol:g})")
        if "load" in info:
            logger.info(f"[export] load it with: {info['load']}")
        if not rel <= tol:
            raise ValueError(f"the merged model's velocity differs from base + adapter by {rel:.3g} of max |v| "
                             f"(> tolerance {tol:g}); the merged folder {out / 'merged'} is not faithful")
    else:
        (out / "export.json").write_text(json.dumps(info, indent=2))
    stages.close()
