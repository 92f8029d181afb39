"""Model FLOPs per trained sample of every preset's model family, and the MFU of a measured throughput.

    python benchmarks/family_flops.py                        table of every diffusers-family preset (results/)
    python benchmarks/family_flops.py --metrics RUN/metrics.jsonl [--peak-tflops 989]
                                                             MFU of a training run (its config.yaml beside it)

For a preset with rollout steps N, CFG factor c (2 with sample.guidance_scale != 1, else 1), T training
timesteps and k = 1 + [beta > 0] + [EMA KL on] forward calls per training row (policy, reference, EMA), with
F = the family's forward FLOPs per sample (its `forward_flops` formula, checked against FlopCounterMode in
tests/models/test_<family>.py; SD3 / FLUX.1: benchmarks/_models.py) at the preset's shapes:

    rollout  = N c F
    training = T (k F + B)   B = the backward of one LoRA training row, counted by FlopCounterMode on the meta
                             device at the family's real config with the preset's LoRA (rank, targets): forward +
                             backward of the policy call - its forward (input gradients through every frozen
                             matmul, the attention backward, the LoRA weight gradients; no checkpoint recompute)
    decode   = D             one sample's VAE decode, counted the same way (benchmarks/_families.py)
    MFU      = (rollout + training + decode) x samples/s / peak FLOP/s

B was once taken as 2 F, which overstated SD3.5-M's training by ~21 % (B = 1.13 F) and its total by ~10 %. The
reward is not counted. Counting every preset takes minutes (Qwen-Image's 60 blocks alone ~50 s on 2 cores), so the
counts are written with the table (results/family_flops.json, each under a key of what it depends on) and
`preset_table(counts)` reuses the ones whose key still matches. Text length: the preset's model.text_tokens (SD3:
77 CLIP + T5), which every padded family computes; Qwen-Image and Z-Image keep each prompt at its own length
(token masks, padded to a multiple of 32), so they are counted at a short GenEval prompt's length after their chat
templates (MASKED_TEXT_LEN: 32 and 64 tokens, an estimate; model.text_tokens is only their cap).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from awm_fast.algorithms.awm import effective_ema_beta  # noqa: E402
from awm_fast.config import Config, list_presets, load_config  # noqa: E402
from awm_fast.families import PIPELINE_KINDS, pipeline_family  # noqa: E402
from awm_fast.families.wan import latent_frames  # noqa: E402
from awm_fast.models.pipeline import meta_transformer, parameter_count  # noqa: E402
from benchmarks import _families, _models  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
H100_BF16_DENSE_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 tensor cores
MASKED_TEXT_LEN = {"qwen_image": 32, "z_image": 64}  # typical padded prompt tokens of the masked families


def latent_shape(cfg: Config) -> tuple[int, ...]:
    """The policy's latent shape of a preset, as the family's build_policy makes it (VAE factor 8; FLUX.2's
    patchified latents: 128 channels at res / 16; Wan: (frames - 1) / 4 + 1 latent frames)."""
    kind, side = cfg.model.kind, cfg.model.resolution // 8
    if kind == "flux2":
        return (128, side // 2, side // 2)
    if kind == "wan":
        return (16, latent_frames(cfg.model.frames), side, side)
    return (16, side, side)


# SD3.5-Large's transformer config (stabilityai/stable-diffusion-3.5-large transformer/config.json): 38 MMDiT
# blocks of 38 x 64 heads, no dual attention; SD3.5-Medium's and FLUX.1-dev's are in benchmarks/_models.py.
SD35L_CONFIG = {**_models.SD35M_CONFIG, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                "pos_embed_max_size": 192, "dual_attention_layers": ()}


def reference_config(cfg: Config) -> dict:
    """The SD3 / FLUX.1 architecture a preset's model.path names (SD3.5-M or -L; FLUX.1-dev, or -schnell:
    the same blocks without the guidance embedding)."""
    path = cfg.model.path.lower()
    if cfg.model.kind == "sd3":
        return SD35L_CONFIG if "large" in path else _models.SD35M_CONFIG
    return {**_models.FLUX_DEV_CONFIG, "guidance_embeds": "schnell" not in path}


@functools.lru_cache(maxsize=None)
def transformer_parameters(class_name: str, config_json: str) -> int:
    """Parameters of a diffusers transformer of the given config (built on the meta device), once per config."""
    return parameter_count(meta_transformer(class_name, json.loads(config_json)))


def text_len(cfg: Config) -> int:
    """Text tokens per sample the transformer sees (module docstring)."""
    if cfg.model.kind == "sd3":
        return 77 + cfg.model.text_tokens
    return min(MASKED_TEXT_LEN.get(cfg.model.kind, cfg.model.text_tokens), cfg.model.text_tokens)


def architecture(cfg: Config) -> tuple[str, dict]:
    """(transformer class name, config) of a preset's reference architecture."""
    kind = cfg.model.kind
    if kind in ("sd3", "flux"):
        return ("SD3Transformer2DModel" if kind == "sd3" else "FluxTransformer2DModel"), reference_config(cfg)
    family = pipeline_family(kind)
    return family.TRANSFORMER_CLASS, family.REFERENCE_CONFIG


def forward_flops(cfg: Config) -> tuple[int, int]:
    """(forward FLOPs per sample, transformer parameters) of a preset's reference architecture."""
    kind, shape = cfg.model.kind, latent_shape(cfg)
    name, config = architecture(cfg)
    params = transformer_parameters(name, json.dumps(config))
    if kind in ("sd3", "flux"):
        fn = _models.mmdit_forward_flops if kind == "sd3" else _models.flux_forward_flops
        return fn(config, shape[1:], text_len(cfg)), params
    return pipeline_family(kind).forward_flops(config, shape, text_len(cfg)), params


def count_key(cfg: Config) -> str:
    """What a preset's counted B and D depend on (architecture, shapes, LoRA, guidance, VAE), hashed."""
    name, config = architecture(cfg)
    m = cfg.model
    what = [name, config, latent_shape(cfg), text_len(cfg), m.lora_rank, m.lora_alpha, list(m.lora_targets),
            m.guidance if m.kind == "flux" else None, m.kind, m.resolution, m.frames if m.kind == "wan" else None]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


_COUNTED: dict[str, dict] = {}  # this process's counts, by key (presets of one model count once)


def counted_flops(cfg: Config, counts: dict[str, dict] | None = None) -> dict:
    """B (`backward`), the LoRA policy's forward and D (`vae_decode`) of preset `cfg`, counted on the meta device,
    or taken from `counts` (key -> counts, `load_counts`) when its key matches."""
    key = count_key(cfg)
    if counts and key in counts:
        return counts[key]
    if key not in _COUNTED:
        name, config = architecture(cfg)
        lora = _families.policy_flops(cfg, _families.meta_call(cfg, name, config, latent_shape(cfg), text_len(cfg)))
        _COUNTED[key] = {"key": key, "backward": lora["backward"], "lora_forward": lora["forward"],
                         "vae_decode": _families.vae_decode_flops(cfg)}
    return _COUNTED[key]


def load_counts(path: Path) -> dict[str, dict]:
    """The counts of an earlier table (results/family_flops.json), by key."""
    rows = json.loads(Path(path).read_text())
    return {r["counted"]["key"]: r["counted"] for r in rows.values() if "counted" in r}


def sample_flops(cfg: Config, counts: dict[str, dict] | None = None) -> dict:
    """The FLOP budget of one trained sample of `cfg` (module docstring)."""
    f, params = forward_flops(cfg)
    counted = counted_flops(cfg, counts)
    s, t = cfg.sample, cfg.train
    cfg_factor = 2 if s.guidance_scale != 1.0 else 1
    calls = 1 + (t.beta > 0) + (effective_ema_beta(t) > 0)
    b, d = counted["backward"], counted["vae_decode"]
    rollout, training = s.num_steps * cfg_factor * f, t.num_timesteps * (calls * f + b)
    return {"kind": cfg.model.kind, "model": cfg.model.path, "params_b": params / 1e9,
            "latent_shape": list(latent_shape(cfg)), "text_len": text_len(cfg), "forward_tflop": f / 1e12,
            "backward_tflop": b / 1e12, "backward_over_forward": b / f, "decode_tflop": d / 1e12,
            "rollout_steps": s.num_steps, "cfg": cfg_factor == 2, "train_timesteps": t.num_timesteps,
            "forward_calls_per_row": calls, "rollout_tflop": rollout / 1e12, "train_tflop": training / 1e12,
            "total_tflop": (rollout + training + d) / 1e12, "counted": counted}


def mfu(total_tflop: float, samples_per_s: float, peak_tflops: float = H100_BF16_DENSE_TFLOPS) -> float:
    if samples_per_s <= 0 or peak_tflops <= 0:
        raise ValueError(f"samples/s {samples_per_s} and peak {peak_tflops} TFLOP/s must be > 0")
    return total_tflop * samples_per_s / peak_tflops


def preset_table(counts: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every preset of a diffusers family (digits excluded); B and D from `counts` where their key matches."""
    rows = {}
    for name in list_presets():
        cfg = load_config(name)
        if cfg.model.kind in PIPELINE_KINDS:
            rows[name] = sample_flops(cfg, counts)
    return rows


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| preset | model | params (B) | latents | text | forward TFLOP | backward (counted) | VAE decode "
             "(counted) | rollout | training | per sample | samples/s at 40% MFU (989 TFLOP/s) |", "|" + "---|" * 12]
    for name, r in rows.items():
        rate = 0.4 * H100_BF16_DENSE_TFLOPS / r["total_tflop"]
        lines.append(f"| {name} | {r['model']} | {r['params_b']:.2f} | {'x'.join(map(str, r['latent_shape']))} "
                     f"| {r['text_len']} | {r['forward_tflop']:.2f} | {r['backward_tflop']:.2f} "
                     f"({r['backward_over_forward']:.2f} F) | {r['decode_tflop']:.2f} | {r['rollout_tflop']:.1f} "
                     f"({r['rollout_steps']} steps{', CFG' if r['cfg'] else ''}) | {r['train_tflop']:.1f} "
                     f"(T={r['train_timesteps']}, {r['forward_calls_per_row']} fwd + bwd) | {r['total_tflop']:.1f} "
                     f"| {rate:.2f} |")
    return "\n".join(lines) + "\n"


def _committed_counts() -> dict[str, dict] | None:
    path = DEFAULT_OUT / "family_flops.json"
    return load_counts(path) if path.is_file() else None


def run_mfu(metrics: Path, peak: float) -> dict:
    """MFU of a training run from its metrics.jsonl (median images_per_s) and the config.yaml beside it."""
    cfg = load_config(str(metrics.parent / "config.yaml"))
    if cfg.model.kind not in PIPELINE_KINDS:
        raise SystemExit(f"{metrics}: model.kind={cfg.model.kind} has no reference architecture to count")
    rates = [json.loads(line)["images_per_s"] for line in metrics.read_text().splitlines() if line.strip()]
    if not rates:
        raise SystemExit(f"{metrics}: no step rows")
    row = sample_flops(cfg, _committed_counts())
    rate = statistics.median(rates)
    return {**row, "images_per_s": rate, "peak_tflops": peak, "mfu": mfu(row["total_tflop"], rate, peak)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metrics", type=Path, help="a run's metrics.jsonl: print that run's MFU")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="the GPU's peak (bf16 dense)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--recount", action="store_true", help="count B and D again for every preset (minutes)")
    args = ap.parse_args(argv)
    if args.metrics:
        result = run_mfu(args.metrics, args.peak_tflops)
        print(f"{result['kind']} ({result['model']}): {result['total_tflop']:.1f} TFLOP per sample x "
              f"{result['images_per_s']:.3f} samples/s = MFU {result['mfu']:.1%} of {args.peak_tflops:.0f} TFLOP/s")
        return result
    rows = preset_table(None if args.recount else _committed_counts())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "family_flops.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "family_flops.md").write_text("# Model FLOPs per trained sample (forward: formula; backward and VAE "
                                              "decode: FlopCounterMode on the meta device; `benchmarks/family_flops.py`)"
                                              "\n\n" + markdown(rows))
    print(markdown(rows), end="")
    return rows


if __name__ == "__main__":
    main()
