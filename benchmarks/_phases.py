"""Phase benchmarks: rollout, training and end-to-end images/s of the fast path, the unfused baseline and
the fast path minus each optimisation, on a random-weight SD3.5-M-shaped MMDiT or FLUX.1-dev-shaped transformer
(`benchmarks._models`).

Everything runs through the trainer's own code: `models.adapt.freeze_and_adapt` (attention backend, LoRA,
checkpointing, compile of the variant's config), `sample_latents` (rollout with `sde_step`),
`algorithms.awm.AWM.micro_batch_loss` (one training micro-batch: rows, the three velocities, `awm_loss`, as the
AWM update runs it), `make_decoder` + `JpegReward` + `group_advantages` (the reward step). The fused ops
are toggled with AWM_FAST_BACKEND (auto: Triton on CUDA; torch: the float64 / Python-op reference).

- fast: bf16 weights (LoRA float32 under bf16 autocast), the shared batch (the policy call with grad + one
  no-grad [ref; ema] call), regional torch.compile of the transformer blocks (`awm_fast.models.compile`), the
  best attention backend of `awm_fast.models.attention`, fused ops, CUDA graphs for the no-grad transformer
  calls (the LoRA routing is a tensor input, so one graph serves every adapter).
- baseline (the official AWM code, benchmarks/_official.py): peft's own LoRA forward with the adapters switched
  by set_adapter / disable_adapters (no routing mask), fp32 weights under fp16 autocast with TF32 matmuls, three
  separate forwards, diffusers' default attention processor, eager, float64 loss (awm_loss backend "torch") and
  Python-op SDE step.
- "fast -X": the fast path with one optimisation X switched back to the baseline's choice.

FLUX (`spec.kind == "flux"`): the policy calls `awm_fast.families.flux.flux_call` (2x2 packing, guidance
embedding 3.5) as the trainer does; attention goes through diffusers' dispatch (`set_flux_attention` with the best
backend; the baseline: diffusers' default, native SDPA), LoRA on the presets' targets (the attention projections
of both block kinds), activation checkpointing of the blocks in every variant (the FLUX presets train with it),
no CFG (the rollout_cfg phase is reported as skipped). Each variant builds its own copy of the weights from the
seed in its dtype, so at most one set of weights is on the device at a time.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import asdict, replace
from typing import Callable

import torch
from tqdm.auto import tqdm

from awm_fast.algorithms.advantages import group_advantages
from awm_fast.algorithms.awm import AWM
from awm_fast.config import Config
from awm_fast.families.flux import flux_call, set_flux_attention
from awm_fast.models.adapt import freeze_and_adapt
from awm_fast.models.attention import use_attention_backend
from awm_fast.models.cuda_graphs import VelocityGraphs
from awm_fast.models.lora import POLICY, adapter_params
from awm_fast.models.merged_lora import MergedLora
from awm_fast.models.pipeline import make_decoder
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.rewards.async_scorer import AsyncRewardScorer
from awm_fast.rewards.jpeg import JpegReward
from awm_fast.sampling.rollout import sample_latents
from awm_fast.sampling.timesteps import time_grid

from benchmarks._attention import working_attention_backend
from benchmarks._models import ModelSpec, build_transformer, build_vae
from benchmarks._official import PeftSwitchedPolicy
from benchmarks._telemetry import Telemetry
from benchmarks._timing import Budget, peak_memory_bytes, time_runs
from benchmarks._variants import (BASELINE, FAST, TOGGLES, Variant, diffusers_default_attention,  # noqa: F401
                                  inactive_reason, loss_backend, ops_backend, precision, release_memory,
                                  variants)

BETA, EMA_BETA, SHIFT, NOISE_LEVEL = 1e-3, 1.0, 3.0, 0.7  # the GenEval preset
PHASES = ("rollout", "rollout_cfg", "train", "end_to_end")


class Bench:
    """One model shape on one device: the seed of the weights, the VAE, inputs, and the variant builder."""

    def __init__(self, spec: ModelSpec, device: torch.device, *, seed: int = 0) -> None:
        self.spec, self.device, self.seed = spec, device, seed
        self.vae = build_vae(spec, device, seed)
        g = torch.Generator(device="cpu").manual_seed(seed)
        cfg = spec.transformer
        n = spec.rollout_batch
        embeds = torch.randn(n, spec.text_len, cfg["joint_attention_dim"], generator=g)
        pooled = torch.randn(n, cfg["pooled_projection_dim"], generator=g)
        self.cond = Conditioning(embeds.to(device), pooled.to(device))
        self.null = Conditioning(torch.zeros_like(self.cond.embeds[:1]), torch.zeros_like(self.cond.pooled[:1]))
        self.grid = time_grid(spec.num_steps, SHIFT, torch.float32)
        self.reward = JpegReward(compressible=True)
        self.reward_overlap = {"score_s": 0.0, "wait_s": 0.0, "calls": 0}
        self._attention: dict[torch.dtype, str] = {}

    def attention_backend(self, dtype: torch.dtype, log=print) -> str:
        """The best attention backend that runs at this model's head size in `dtype` (probed once per dtype:
        benchmarks/_attention.py); a failing one falls back along the priority list."""
        if dtype not in self._attention:
            cfg, spec = self.spec.transformer, self.spec
            patch = 2 if spec.kind == "flux" else cfg["patch_size"]
            tokens = spec.latent[1] * spec.latent[2] // patch ** 2 + spec.text_len
            self._attention[dtype] = working_attention_backend(
                self.device, dtype, cfg["num_attention_heads"], cfg["attention_head_dim"], tokens,
                flux=spec.kind == "flux", log=log).backend
        return self._attention[dtype]

    def config(self, variant: Variant) -> Config:
        """The trainer config of a variant: the presets' LoRA (rank of the spec, alpha 2 r, gaussian init, the
        attn.* targets of SD3 and FLUX alike), checkpointing as the spec's presets, compile, shared batch, and
        the GenEval preset's AWM loss (beta 1e-3, EMA beta 1, discrete_wo_init times with fraction 0.9)."""
        cfg, spec = Config(), self.spec
        cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_init = spec.lora_rank, 2 * spec.lora_rank, "gaussian"
        cfg.model.compile = variant.compile_blocks
        cfg.model.fp8, cfg.model.merged_lora = variant.fp8, variant.merged_lora
        cfg.sample.shift = SHIFT
        t = cfg.train
        t.gradient_checkpointing, t.shared_batch, t.num_timesteps = spec.gradient_checkpointing, variant.shared_batch, \
            spec.num_timesteps
        t.beta, t.ema_beta, t.timestep_sampling, t.timestep_fraction = BETA, EMA_BETA, "discrete_wo_init", 0.9
        return cfg

    def policy(self, variant: Variant, log=print) -> tuple[FlowPolicy, str]:
        """The seeded weights in the variant's dtype made trainable by the trainer's `freeze_and_adapt` (its
        attention, LoRA "default" + "ema", checkpointing, compile); routed LoRA (FlowPolicy) or peft's adapter
        switching (the baseline)."""
        dtype, _ = precision(variant, self.device)
        flux = self.spec.kind == "flux"
        tr = build_transformer(self.spec, self.device, self.seed, dtype)
        attention = ["diffusers default (FluxAttnProcessor, native SDPA dispatch)" if flux else
                     "diffusers default (JointAttnProcessor2_0, SDPA)"]

        def set_attention(module) -> None:
            if variant.best_attention:
                attention[0] = self.attention_backend(dtype, log)
                if flux:
                    set_flux_attention(module, attention[0])
                    attention[0] += " (diffusers dispatch)"
                else:
                    use_attention_backend(module, attention[0])
            elif flux:
                diffusers_default_attention()

        tr = freeze_and_adapt(tr, self.config(variant), self.device, dtype, attention=set_attention)
        vae = copy.deepcopy(self.vae).to(dtype)
        cond = self.cond

        def encode(prompts):
            return cond[: len(prompts)]

        call = functools.partial(flux_call, guidance=self.spec.guidance) if flux else None
        kind = FlowPolicy if variant.routed_lora else PeftSwitchedPolicy
        policy = kind(tr, encode, make_decoder(vae), self.spec.latent, self.device, dtype, call=call)
        if variant.merged_lora:
            policy.merged = MergedLora(tr)
        if variant.compile_blocks and self.device.type == "cuda":  # as the trainer: model.vae_compile on CUDA
            policy.decode.speed_up()
        if variant.cuda_graphs and self.device.type == "cuda":
            policy.graphs = VelocityGraphs(policy.forward)
        return policy, attention[0]

    # --- the timed workloads -------------------------------------------------------------------------------
    def rollout(self, policy: FlowPolicy, cfg: bool, gen: torch.Generator) -> torch.Tensor:
        w = self.spec.guidance_scale if cfg else 1.0
        x0, _ = sample_latents(policy, self.cond, self.grid, sampler="euler_maruyama", noise_level=NOISE_LEVEL,
                               generator=gen, guidance_scale=w, null_cond=self.null if cfg else None)
        return x0

    def train_micro_batch(self, policy: FlowPolicy, variant: Variant, latents: torch.Tensor, adv: torch.Tensor,
                          idx: torch.Tensor, gen: torch.Generator, num_micro: int) -> None:
        """One AWM micro-batch as the trainer's AWM update runs it (AWM.micro_batch_loss), then its backward."""
        loss, _ = AWM(self.config(variant)).micro_batch_loss(policy, latents[idx], self.cond[idx], adv[idx], self.grid,
                                                             gen, backend=loss_backend(variant))
        (loss / num_micro).backward()

    def end_to_end(self, policy: FlowPolicy, variant: Variant, gen: torch.Generator) -> None:
        """Rollout -> VAE decode -> JPEG reward -> advantages -> training of every micro-batch of the batch.

        The whole rollout batch samples in one call per step (the trainer's sample.batch_size; two halves would
        make the eager baseline pay its launch overhead twice); the decoded batch is scored on the reward thread
        pool, and `reward_overlap` records the reward's own time and the time the loop blocked waiting for it."""
        with AsyncRewardScorer(self.reward) as scorer:
            x0, _ = sample_latents(policy, self.cond, self.grid, sampler="euler_maruyama", noise_level=NOISE_LEVEL,
                                   generator=gen)
            scorer.submit(policy.decode(x0), [""] * len(x0), [{}] * len(x0))
            outs = scorer.gather()
            self.reward_overlap["score_s"] += sum(t.score_s for t in scorer.timings)
            self.reward_overlap["wait_s"] += scorer.wait_time()
            self.reward_overlap["calls"] += 1
        rewards = torch.cat([o["reward"] for o in outs])
        adv = group_advantages(rewards, torch.zeros(len(rewards), dtype=torch.long)).to(self.device)
        mb = self.spec.micro_batch
        num_micro = x0.shape[0] // mb
        for i in range(num_micro):
            idx = torch.arange(i * mb, (i + 1) * mb, device=self.device)
            self.train_micro_batch(policy, variant, x0, adv, idx, gen, num_micro)


def overlap_fields(overlap: dict) -> dict:
    """Per end-to-end call: the reward's own ms and the ms the loop blocked on it (end_to_end rows only)."""
    if not overlap["calls"]:
        return {"reward_score_ms": None, "reward_wait_ms": None}
    return {"reward_score_ms": 1e3 * overlap["score_s"] / overlap["calls"],
            "reward_wait_ms": 1e3 * overlap["wait_s"] / overlap["calls"]}


def _reps(device: torch.device, quick: bool, spec: ModelSpec) -> dict:
    if device.type != "cuda":
        return {"warmup": 1, "reps": spec.cpu_reps}
    return {"warmup": 1, "reps": 3} if quick else {"warmup": 2, "reps": 5}


class FallbackLines(logging.Handler):
    """The warnings awm_fast logs while a variant runs: each fast-path piece that fails on this machine (a block
    class's compile, a CUDA-graph capture, an attention backend's probe) falls back with one such line and the run
    goes on, so a row measured after one says so in its `fallbacks` field."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage()[:300])

    def __enter__(self) -> "FallbackLines":
        logging.getLogger("awm_fast").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("awm_fast").removeHandler(self)


def run_variant(bench: Bench, variant: Variant, phases: tuple[str, ...], quick: bool, flops: dict,
                matmul_flops: float | None, log=print, *, emit: Callable[[dict], None],
                budget: Budget | None = None) -> None:
    """Every phase of one variant: images/s (median, 20/80 %), peak memory, telemetry, MFU; each phase's row is
    handed to `emit` as soon as it is measured (a run cut later keeps it). A phase due after `budget` is spent is
    emitted as not run."""
    with FallbackLines() as fallbacks:
        _run_variant(bench, variant, phases, quick, flops, matmul_flops, log,
                     lambda row: emit({**row, "fallbacks": "; ".join(fallbacks.lines) or None}), budget)


def _run_variant(bench: Bench, variant: Variant, phases: tuple[str, ...], quick: bool, flops: dict,
                 matmul_flops: float | None, log, emit: Callable[[dict], None],
                 budget: Budget | None) -> None:
    dev, spec = bench.device, bench.spec
    row0 = {"variant": variant.name, "model": spec.name, "images_per_call": None,
            **{f"opt_{k}": v for k, v in asdict(variant).items() if k != "name"}}
    try:
        policy, attention = bench.policy(variant, log=log)
    except torch.cuda.OutOfMemoryError:  # e.g. the float32 weights of a large model
        release_memory(dev)
        for phase in phases:
            emit({**row0, "phase": phase, "status": "oom (building the model)"})
        return
    _, autocast = precision(variant, dev)
    lora = list(adapter_params(policy.transformer, POLICY).values())
    gen = torch.Generator(device=dev).manual_seed(1)
    adv = torch.linspace(-1, 1, spec.rollout_batch, device=dev)
    latents = torch.randn(spec.rollout_batch, *spec.latent, device=dev, generator=gen)
    mb = spec.micro_batch
    work = {
        "rollout": (lambda: bench.rollout(policy, False, gen), spec.rollout_batch),
        "rollout_cfg": (lambda: bench.rollout(policy, True, gen), spec.rollout_batch),
        "train": (lambda: bench.train_micro_batch(policy, variant, latents, adv, torch.arange(mb, device=dev), gen, 1),
                  mb),
        "end_to_end": (lambda: bench.end_to_end(policy, variant, gen), spec.rollout_batch),
    }

    def clear_grads() -> None:
        for p in lora:
            p.grad = None

    for phase in phases:
        fn, images = work[phase]
        bench.reward_overlap = {"score_s": 0.0, "wait_s": 0.0, "calls": 0}
        row = {"variant": variant.name, "phase": phase, "model": spec.name, "images_per_call": images,
               "attention": attention, "grad_checkpointing": spec.gradient_checkpointing,
               **{f"opt_{k}": v for k, v in asdict(variant).items() if k != "name"}}
        if budget is not None and budget.spent():
            emit({**row, "status": budget.skip()})
            continue
        try:
            with autocast(), ops_backend(variant.fused_ops):
                clear_grads()
                peak = peak_memory_bytes(fn, dev)  # also the first (compiling) call
                with Telemetry(dev) as tel:
                    timing = time_runs(fn, dev, setup=clear_grads, **_reps(dev, quick, spec))
        except torch.cuda.OutOfMemoryError:
            release_memory(dev)
            emit({**row, "status": "oom"})
            continue
        ips = images / (timing.median_ms * 1e-3)
        model_flops = flops.get(f"{phase}_per_image")
        mfu = 100 * model_flops * ips / matmul_flops if model_flops and matmul_flops else None
        emit({**row, "status": "ok", **timing.as_dict(), "images_per_s": ips,
              "images_per_s_p20": images / (timing.p80_ms * 1e-3),
              "images_per_s_p80": images / (timing.p20_ms * 1e-3), "peak_mem_bytes": peak,
              "model_tflop_per_image": model_flops / 1e12 if model_flops else None, "mfu_pct": mfu,
              **{f"telemetry_{k}": v for k, v in tel.summary().items()},
              **overlap_fields(bench.reward_overlap)})
    del policy, work
    release_memory(dev)


def run_phases(bench: Bench, phases: tuple[str, ...], quick: bool, allow_compile: bool, matmul_flops: float | None,
               flops: dict, log=print, *, only: str | None = None, budget: Budget | None = None,
               rows: list[dict] | None = None, on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Every variant (or those `only` names, see `variants`), fast and baseline first, with `flops` the model's
    FLOPs (`benchmarks._flops.model_flops`); a compile failure falls back to eager for that variant's remaining
    phases (noted in the rows). A variant or phase due after `budget` is spent is reported as not run. Each row is
    appended to `rows` (a new list by default) as soon as it is measured and `on_row(row)` runs then, so a caller
    holds (and can save) every finished phase even if a later one raises or the process is killed."""
    rows = [] if rows is None else rows

    def emit(row: dict) -> None:
        rows.append(row)
        with_speedups(rows)
        if on_row is not None:
            on_row(row)

    if "rollout_cfg" in phases and not bench.spec.uses_cfg:
        phases = tuple(p for p in phases if p != "rollout_cfg")
        emit({"variant": "*", "phase": "rollout_cfg", "model": bench.spec.name,
              "status": "skipped: no CFG in this model's presets (guidance-distilled FLUX.1-dev samples with "
                        f"guidance embedding {bench.spec.guidance}, guidance_scale 1)"})
    for variant in tqdm(variants(only), desc="phases", unit="variant", disable=None):
        reason = inactive_reason(variant, bench.device, allow_compile)
        status = f"skipped: {reason}" if reason else (budget.skip() if budget is not None and budget.spent() else None)
        if status:
            emit({"variant": variant.name, "phase": "*", "model": bench.spec.name, "status": status})
            continue
        if not allow_compile:
            variant = replace(variant, compile_blocks=False)
        run_variant_or_eager(bench, variant, phases, quick, flops, matmul_flops, log, emit=emit, budget=budget)
    return with_speedups(rows)


def run_variant_or_eager(bench: Bench, variant: Variant, phases: tuple[str, ...], quick: bool, flops: dict,
                         matmul_flops: float | None, log=print, *, emit: Callable[[dict], None],
                         budget: Budget | None = None) -> None:
    """`run_variant`; when compiling the blocks fails, the phases not yet measured run again with eager blocks
    (their rows say so in `note`); the phases measured before the failure keep their compiled rows."""
    done: list[str] = []

    def keep(row: dict) -> None:
        done.append(row["phase"])
        emit(row)

    try:
        run_variant(bench, variant, phases, quick, flops, matmul_flops, log=log, emit=keep, budget=budget)
        return
    except Exception as exc:
        if not variant.compile_blocks:
            raise
        note = f"compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); eager blocks"
    # outside the except block: the failed variant's frames (and its weights) are released first
    log(f"[phases] {variant.name}: {note}")
    torch._dynamo.reset()
    release_memory(bench.device)
    rest = tuple(p for p in phases if p not in done)
    run_variant(bench, replace(variant, compile_blocks=False), rest, quick, flops, matmul_flops, log,
                emit=lambda row: emit({**row, "note": note}), budget=budget)


def with_speedups(rows: list[dict]) -> list[dict]:
    """`speedup_vs_baseline` of every measured row: its images/s over the baseline's, same model and phase (None
    where either is missing)."""
    base = {(r.get("model"), r["phase"]): r.get("images_per_s") for r in rows if r["variant"] == "baseline"}
    for r in rows:
        ref = base.get((r.get("model"), r["phase"]))
        r["speedup_vs_baseline"] = r["images_per_s"] / ref if ref and r.get("images_per_s") else None
    return rows
