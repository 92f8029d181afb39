"""Typed configuration: dataclasses loaded from YAML with `section.key=value` overrides, then validated.

Every value is checked before any work starts: an unknown key, a wrong type or an impossible combination
raises `ConfigError` (a ValueError) with one line naming the key and the value.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "configs"
# The official lora_type "attn": the joint-attention projections. The "attn." prefix matters: bare names also hit
# attn2.* of SD3.5-M's 13 dual-attention blocks (243 LoRA modules instead of the official 191).
SD3_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out"]


def cache_root() -> Path:
    """Where the project caches what it builds (digits artefacts, prompt embeddings): $AWM_FAST_CACHE or
    ~/.cache/awm-fast."""
    return Path(os.environ.get("AWM_FAST_CACHE", Path.home() / ".cache" / "awm-fast"))


class ConfigError(ValueError):
    """A configuration problem, reported as one line before any work starts."""


AUTO = "auto"
# A fast-path switch: true | false | auto ("on where it works": on for a CUDA device, off on the CPU and where the
# run cannot use it; resolved against the device by awm_fast.models.fast_path)
Switch = typing.Union[bool, typing.Literal["auto"]]


@dataclass
class ModelConfig:
    kind: str = "digits"  # digits | sd3 | flux
    path: str = ""  # diffusers folder or hub id (sd3, flux); unused for digits
    dtype: str = "float32"  # weights/compute dtype of the transformer: float32 | bfloat16 | float16
    lora_rank: int = 32
    lora_alpha: int = 64
    lora_init: str = "gaussian"
    lora_targets: list[str] = field(default_factory=lambda: list(SD3_LORA_TARGETS))
    resolution: int = 512
    frames: int = 1  # video frames per sample (model.kind=wan: frames - 1 divisible by 4, e.g. 33, 81); 1 = images
    text_tokens: int = 128  # T5 tokens per prompt (128 as the official SD3 RL code; FLUX presets use 512)
    guidance: float = 3.5  # FLUX guidance-embedding value (ignored by models without one)
    attention_backend: str = "auto"  # auto | flash3 | flash2 | xformers | sdpa_cudnn | sdpa_flash | sdpa_efficient | sdpa_math
    compile: Switch = AUTO  # regional torch.compile of the transformer blocks (models/compile.py); auto: on CUDA
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: trace without code generation)
    fp8: bool = False  # frozen base projections in float8 (models/fp8.py): CUDA sm_89+, emulated on the CPU
    merged_lora: bool = False  # no-grad calls on merged LoRA weight copies (models/merged_lora.py)
    vae_compile: bool = True  # the VAE decoder compiled, channels_last (CUDA only; the CPU decodes eager)


@dataclass
class SampleConfig:
    num_steps: int = 14
    shift: float = 3.0
    sampler: str = "euler_maruyama"  # euler_maruyama | cps | ode | sa_solver
    noise_level: float = 0.7  # SDE noise a (euler_maruyama, cps); tau inside the window (sa_solver, official 0.4)
    sa_noise_t_min: float = 0.3  # sa_solver: noise only where sa_noise_t_min <= t <= sa_noise_t_max
    sa_noise_t_max: float = 0.9
    guidance_scale: float = 1.0  # 1 = classifier-free guidance off
    cuda_graphs: Switch = AUTO  # replay the no-grad transformer calls (rollout steps) as CUDA graphs; auto: on CUDA
    prompts_per_step: int = 72
    group_size: int = 24
    batch_size: int = 6  # images per rollout batch
    eval_num_steps: int = 40
    eval_guidance_scale: float = 1.0
    prompt_file: str = ""  # one prompt per line (model.kind=sd3); digits uses the digits 0-9
    eval_prompt_file: str = ""  # evaluation prompts (e.g. prompts/geneval_test.txt); empty: prompt_file
    eval_prompts: int = 64  # how many evaluation prompts are used (sd3, flux)
    eval_batch_size: int = 0  # samples per evaluation call; 0 = max(sample.batch_size, 64) (videos: set it small)


@dataclass
class TrainConfig:
    algorithm: str = "awm"  # awm | flow_grpo | nft (awm_fast/algorithms/: one module each, its keys in its section)
    finetune: str = "lora"  # lora (DDP under torchrun) | full (every transformer weight; FSDP2 under torchrun)
    steps: int = 200
    micro_batch: int = 3  # images per training micro-batch (rows = micro_batch * num_timesteps)
    num_timesteps: int = 6
    timestep_sampling: str = "discrete_wo_init"  # discrete_wo_init | discrete | uniform | logit_normal
    timestep_fraction: float = 0.9
    weighting: str = "ghuber"  # ghuber | uniform | t | t2 | huber
    ghuber_power: float = 0.25
    ratio_mode: str = "exp_first"  # exp_first | sum_first
    clip_range: float = 1.0
    beta: float = 0.001
    ema_beta: float = 1.0
    ema_kl_without_beta: bool = False  # official: no KL term at all when beta = 0; true keeps the EMA KL alone
    kl_weighting: str = "uniform"  # uniform | elbo: the reference KL term's (official kl_weight)
    kl_ema_weighting: str = "uniform"  # uniform | elbo: the EMA KL term's (official kl_ema_weight)
    adv_clip_max: float = 5.0
    lr: float = 3e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    ema_decay_rate: float = 0.001  # "ema" adapter decay d = min(ema_decay_cap, ema_decay_rate * step)
    ema_decay_cap: float = 0.3
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward (less memory)
    shared_batch: Switch = AUTO  # policy call + ONE no-grad [ref; ema] call per micro-batch (models/shared_batch.py)
    eval_ema: bool = True  # evaluation EMA of the LoRA weights, decay min((1 + n) / (10 + n), 0.99)
    max_nonfinite_steps: int = 3  # stop after this many steps in a row with a non-finite loss/grad (0: never)
    seed: int = 42


@dataclass
class FlowGRPOConfig:
    """train.algorithm=flow_grpo (awm_fast/algorithms/flow_grpo.py); official yifan123/flow_grpo geneval_sd3."""

    clip_range: float = 1e-4  # ratio clip c
    beta: float = 0.04  # KL to the reference in mean space (0.04 GenEval/OCR, 0.01 PickScore)
    sde_window: int = 0  # 0 = SDE at every step; k = "Fast": SDE (and training) on k steps only
    optimizer_steps: int = 2  # optimizer steps per rollout (official 2; the ratio clip acts from the 2nd)


@dataclass
class NFTConfig:
    """train.algorithm=nft (awm_fast/algorithms/nft.py); official NVlabs/DiffusionNFT config/nft.py."""

    beta: float = 1.0  # b in v+- (implicit positive / negative policies)
    kl_beta: float = 1e-4  # weight of mean (v - v_ref)^2
    decay_rate: float = 0.001  # "old" policy (the "ema" adapter) decay d = min(decay_cap, decay_rate * step)
    decay_cap: float = 0.5
    decay_flat: int = 0  # d = 0 for the first decay_flat steps, then min(decay_cap, decay_rate (step - decay_flat))
    timestep_fraction: float = 0.99  # each sample trains int(num_steps * this) rollout timesteps (official: 9 of 10)
    sampler: str = "dpm2"  # rollout of the "old" policy: dpm2 (official, sampling/dpm_solver.py) | ode (Euler)


@dataclass
class RewardConfig:
    # digits | jpeg_compressibility | jpeg_incompressibility | pickscore | clipscore | aesthetic | ocr | geneval,
    # or "package.module:function" (a user reward), or several joined by "+" (a weighted sum, see weights)
    name: str = "digits"
    weights: list[float] = field(default_factory=list)  # one per "+" component of name; empty = all 1
    # constructor options: {model: /ckpt/PickScore_v1} for one reward, {aesthetic: {head: /ckpt/head.pth}} per
    # component of a combination (see awm_fast.rewards.load_reward)
    options: dict[str, typing.Any] = field(default_factory=dict)
    num_workers: int = 1  # reward threads overlapping sampling; 0 = score inline (faster on CPU-only machines)
    retries: int = 2  # a reward call that raises (server, network) is retried this many times, then the run stops
    retry_wait_s: float = 5.0  # first wait between retries (doubles each time)
    # longest one reward call may take (all its HTTP requests included); a call still running then stops the run
    # (not retried). Worst case of a failing reward: (retries + 1) x timeout_s + the waits (train/faults.py)
    timeout_s: float = 300.0


@dataclass
class DigitsConfig:
    pretrain_steps: int = 150
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    classifier_steps: int = 600
    eval_per_digit: int = 20


@dataclass
class RunConfig:
    output_dir: str = "runs"
    name: str = ""  # empty: a timestamped name
    eval_every: int = 0  # 0: only before and after
    log_every_s: float = 30.0  # stdout not a terminal: a progress line at most this often (0: every step)
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    tensorboard: bool = True
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads; 0 = all cores
    dist_backend: str = "auto"  # torchrun runs: auto (nccl on GPUs, gloo on CPU) | nccl | gloo
    dist_timeout_s: float = 1800.0  # a collective waiting longer (a rank died or hangs) stops the run with an error
    nproc: int = 0  # `awm-fast train` outside torchrun: processes on this node (0: one per visible GPU, 1 on CPU)
    wandb: bool = False  # also log to Weights & Biases (pip install awm-fast[wandb]; train/wandb_logger.py)
    wandb_project: str = "awm-fast"
    wandb_name: str = ""  # empty: the run folder's name
    wandb_mode: str = "online"  # online | offline (no network; `wandb sync` later) | disabled


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    flow_grpo: FlowGRPOConfig = field(default_factory=FlowGRPOConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    digits: DigitsConfig = field(default_factory=DigitsConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _owned(where: str):
    """The object "module:NAME" names, imported when asked for: config imports no package above it (and stays
    importable without diffusers)."""
    import importlib

    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


class _Owned:
    """The choices of a setting, defined by their owner ("module:NAME", a tuple or a dict's keys) and imported
    when first read (`_owned`)."""

    def __init__(self, where: str) -> None:
        self.where, self._choices = where, None

    def choices(self) -> tuple:
        if self._choices is None:
            self._choices = tuple(_owned(self.where))
        return self._choices

    def __contains__(self, value) -> bool:
        return value in self.choices()

    def __iter__(self):
        return iter(self.choices())

    def __len__(self) -> int:
        return len(self.choices())

    def __repr__(self) -> str:
        return repr(self.choices())


class _RewardNames(_Owned):
    """reward.name choices: a registered name, an import path "package.module:function", or several joined by "+"."""

    def __contains__(self, value) -> bool:
        import re

        return isinstance(value, str) and all(
            p in self.choices() or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", p) is not None
            for p in value.split("+"))

    def __repr__(self) -> str:
        return f"{self.choices()!r}, 'package.module:function', or several joined by '+'"


CHOICES = {  # each list lives with its owner
    "model.kind": _Owned("awm_fast.families:MODEL_KINDS"),
    "model.dtype": _Owned("awm_fast.env:DTYPES"),
    "model.lora_init": _Owned("awm_fast.models.lora:LORA_INITS"),
    "model.attention_backend": _Owned("awm_fast.models.attention:BACKENDS"),
    "model.compile_mode": _Owned("awm_fast.models.compile:MODES"),
    "sample.sampler": _Owned("awm_fast.sampling.rollout:SAMPLERS"),
    "train.algorithm": _Owned("awm_fast.algorithms:ALGORITHM_NAMES"),
    "nft.sampler": _Owned("awm_fast.algorithms.nft:NFT_SAMPLERS"),
    "train.finetune": _Owned("awm_fast.models.finetune:FINETUNE_MODES"),
    "train.timestep_sampling": _Owned("awm_fast.sampling.timesteps:TIMESTEP_MODES"),
    "train.weighting": _Owned("awm_fast.ops.awm_loss_torch:WEIGHTINGS"),
    "train.ratio_mode": _Owned("awm_fast.ops.awm_loss_torch:RATIO_MODES"),
    "train.kl_weighting": _Owned("awm_fast.ops.awm_loss_torch:KL_WEIGHTINGS"),
    "train.kl_ema_weighting": _Owned("awm_fast.ops.awm_loss_torch:KL_WEIGHTINGS"),
    "reward.name": _RewardNames("awm_fast.rewards:REWARDS"),
    "run.device": _Owned("awm_fast.env:DEVICES"),
    "run.dist_backend": ("auto", "nccl", "gloo"),
    "run.wandb_mode": ("online", "offline", "disabled"),
}
VIDEO_KINDS = {"wan": 4}  # model.kind -> its VAE's temporal compression (model.frames = 4 k + 1)
# Keys a resumed run (`awm-fast train --resume`) may not change: the weights' shapes (model, LoRA), what the
# optimizer and EMA states belong to, and the step's batch geometry and seeds (the sampler's position means a
# given prompt plan). A key ending in "." is a whole section; see awm_fast/train/resume.py.
NON_RESUMABLE = ("model.kind", "model.path", "model.dtype", "model.lora_rank", "model.lora_alpha", "model.lora_init",
                 "model.lora_targets", "model.resolution", "model.frames", "model.text_tokens", "model.guidance",
                 "sample.prompts_per_step", "sample.group_size", "sample.batch_size", "sample.num_steps",
                 "train.micro_batch", "train.num_timesteps", "train.algorithm", "train.finetune", "train.seed",
                 "train.eval_ema", "digits.")
POSITIVE = ["model.text_tokens", "model.lora_rank", "model.lora_alpha", "model.resolution", "sample.num_steps", "sample.shift",
            "sample.prompts_per_step", "sample.batch_size", "sample.eval_num_steps", "sample.eval_prompts", "train.steps",
            "model.frames",
            "train.micro_batch", "train.num_timesteps", "train.ghuber_power", "train.clip_range",
            "train.adv_clip_max", "flow_grpo.clip_range", "flow_grpo.optimizer_steps", "nft.beta",
            "nft.timestep_fraction", "train.lr", "train.adam_eps", "train.max_grad_norm",
            "digits.pretrain_batch", "digits.pretrain_lr", "digits.eval_per_digit", "run.keep_checkpoints",
            "run.dist_timeout_s", "reward.timeout_s"]
NON_NEGATIVE = ["reward.num_workers", "sample.eval_batch_size", "sample.noise_level", "train.beta", "train.ema_beta", "train.weight_decay", "train.ema_decay_rate",
                "train.ema_decay_cap", "flow_grpo.beta", "flow_grpo.sde_window", "nft.kl_beta",
                "nft.decay_rate", "nft.decay_cap", "nft.decay_flat", "digits.pretrain_steps", "digits.classifier_steps", "run.eval_every",
                "run.checkpoint_every", "run.threads", "run.nproc", "train.max_nonfinite_steps", "reward.retries",
                "reward.retry_wait_s", "run.log_every_s"]
MAX_LORA_RANK = 4096  # above every supported family's layer width (<= 5120): a larger rank cannot add anything


def _non_finite(key: str, value) -> tuple[str, float] | None:
    """(dotted path, value) of the first inf / nan float in `value` (a number, list or mapping), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _non_finite(f"{key}.{k}" if isinstance(value, dict) else f"{key}[{k}]", v)
        if found:
            return found
    return None


def _check_type(key: str, value, annotation):
    origin = typing.get_origin(annotation)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping with string keys, got {value!r}")
        return dict(value)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation == Switch:
        if not isinstance(value, bool) and value != AUTO:
            raise ConfigError(f"{key}: expected true, false or auto, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation}")


def _section_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _merge(cfg: Config, data: dict, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    sections = _section_types(Config)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{source}: unknown section {section!r} (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value)


# Keys that moved (the algorithms' own sections, 2026-12): the old names still set the new keys, so older
# YAML files and the configs saved in older checkpoints load unchanged.
RENAMED_KEYS = {f"train.grpo_{k}": f"flow_grpo.{k}" for k in ("clip_range", "beta", "sde_window", "optimizer_steps")}
RENAMED_KEYS |= {f"train.nft_{k}": f"nft.{k}" for k in ("beta", "kl_beta", "decay_rate", "decay_cap",
                                                        "timestep_fraction", "sampler")}


def set_value(cfg: Config, dotted: str, value) -> None:
    """Set `section.key` with type checking; raises ConfigError for an unknown key or a wrong type."""
    dotted = RENAMED_KEYS.get(dotted, dotted)
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{dotted!r}: keys have the form section.key (e.g. train.lr)")
    section, key = parts
    sections = _section_types(Config)
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r} in {dotted!r} (known: {', '.join(sections)})")
    sub = getattr(cfg, section)
    types = _section_types(type(sub))
    if key not in types:
        raise ConfigError(f"unknown config key {dotted!r} (known in {section}: {', '.join(types)})")
    setattr(sub, key, _check_type(dotted, value, types[key]))


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a bundled preset (see `list_presets`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset (presets: {', '.join(list_presets())})")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(config: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- preset/YAML file <- overrides, then `validate`. The default is the digits preset."""
    cfg = Config()
    path = resolve_config_path(config or "digits")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    _merge(cfg, data, str(path))
    for text in overrides:
        set_value(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first impossible value or combination."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            bad = _non_finite(f"{section.name}.{f.name}", getattr(getattr(cfg, section.name), f.name))
            if bad:
                raise ConfigError(f"{bad[0]}={bad[1]}: must be a finite number")
    for dotted, choices in CHOICES.items():
        if _get(cfg, dotted) not in choices:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r} is not one of {choices}")
    for dotted in POSITIVE:
        if not _get(cfg, dotted) > 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r} must be > 0")
    for dotted in NON_NEGATIVE:
        if not _get(cfg, dotted) >= 0:
            raise ConfigError(f"{dotted}={_get(cfg, dotted)!r} must be >= 0")
    s, t, m = cfg.sample, cfg.train, cfg.model
    if m.lora_rank > MAX_LORA_RANK:
        raise ConfigError(f"model.lora_rank={m.lora_rank} exceeds {MAX_LORA_RANK} (wider than any supported model's layers)")
    bad = _owned("awm_fast.rewards:unknown_option")(cfg.reward.name, cfg.reward.options)  # the reward's own keys
    if bad:
        raise ConfigError(f"reward.options.{bad[0]}: not an option of reward {cfg.reward.name!r} (it takes: {bad[1]})")
    if s.cuda_graphs is True and m.compile is not False and m.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ConfigError(f"sample.cuda_graphs=true with model.compile_mode={m.compile_mode!r}: that mode captures CUDA "
                          "graphs of its own; use one or the other (e.g. compile_mode=max-autotune-no-cudagraphs)")
    if s.group_size < 2:
        raise ConfigError(f"sample.group_size={s.group_size}: group advantages need at least 2 samples per prompt")
    images = s.prompts_per_step * s.group_size
    if images % s.batch_size:
        raise ConfigError(f"sample.batch_size={s.batch_size} does not divide the {images} images per step "
                          f"(prompts_per_step {s.prompts_per_step} x group_size {s.group_size})")
    if s.batch_size % t.micro_batch:
        raise ConfigError(f"train.micro_batch={t.micro_batch} does not divide the rollout batch sample.batch_size={s.batch_size}")
    if not 0 < t.timestep_fraction <= 1:
        raise ConfigError(f"train.timestep_fraction={t.timestep_fraction} must be in (0, 1]")
    if t.timestep_sampling.startswith("discrete"):
        discrete_boundaries = _owned("awm_fast.sampling.timesteps:discrete_boundaries")
        try:
            discrete_boundaries(s.num_steps, t.num_timesteps, t.timestep_fraction, t.timestep_sampling == "discrete")
        except ValueError as exc:
            raise ConfigError(f"train.num_timesteps={t.num_timesteps} with sample.num_steps={s.num_steps}: {exc}") from None
    if t.ema_decay_cap >= 1:
        raise ConfigError(f"train.ema_decay_cap={t.ema_decay_cap} must be < 1")
    if cfg.nft.decay_cap >= 1:
        raise ConfigError(f"nft.decay_cap={cfg.nft.decay_cap} must be < 1")
    if cfg.nft.timestep_fraction > 1 or int(s.num_steps * cfg.nft.timestep_fraction) < 1:
        raise ConfigError(f"nft.timestep_fraction={cfg.nft.timestep_fraction} must be <= 1 and leave "
                          f"int(sample.num_steps {s.num_steps} * it) >= 1 training timesteps")
    if not 0 <= s.sa_noise_t_min <= s.sa_noise_t_max <= 1:
        raise ConfigError(f"sample.sa_noise_t_min/sa_noise_t_max=({s.sa_noise_t_min}, {s.sa_noise_t_max}) must satisfy "
                          "0 <= min <= max <= 1")
    if t.algorithm == "flow_grpo" and s.sampler not in _Owned("awm_fast.algorithms.flow_grpo:TRAJECTORY_SAMPLERS"):
        raise ConfigError(f"train.algorithm=flow_grpo needs a stochastic sampler with log-probs "
                          f"(sample.sampler=euler_maruyama or cps), got {s.sampler!r}; its official rollout: "
                          f"sample.sampler=euler_maruyama sample.noise_level=0.7")
    g = cfg.flow_grpo
    if t.algorithm == "flow_grpo" and not (s.noise_level > 0 and g.sde_window <= s.num_steps // 2):
        raise ConfigError(f"train.algorithm=flow_grpo needs sample.noise_level > 0 and flow_grpo.sde_window="
                          f"{g.sde_window} <= sample.num_steps // 2 = {s.num_steps // 2} (official: the window "
                          "starts in {0, ..., num_steps // 2 - window})")
    if t.algorithm == "flow_grpo" and (images // t.micro_batch) % g.optimizer_steps:
        raise ConfigError(f"flow_grpo.optimizer_steps={g.optimizer_steps} must divide the {images // t.micro_batch} "
                          f"training micro-batches per step ({images} images / train.micro_batch {t.micro_batch})")
    if not 0 <= t.adam_beta1 < 1 or not 0 <= t.adam_beta2 < 1:
        raise ConfigError(f"train.adam_beta1/adam_beta2=({t.adam_beta1}, {t.adam_beta2}) must be in [0, 1)")
    if m.kind != "digits" and not s.prompt_file:
        raise ConfigError(f"sample.prompt_file is empty: model.kind={m.kind} trains on prompts from a text file")
    if m.frames != 1 and m.kind not in VIDEO_KINDS:
        raise ConfigError(f"model.frames={m.frames}: model.kind={m.kind} generates images (frames 1); video kinds: "
                          f"{', '.join(VIDEO_KINDS)}")
    if m.kind in VIDEO_KINDS and (m.frames - 1) % VIDEO_KINDS[m.kind]:
        raise ConfigError(f"model.frames={m.frames}: {m.kind}'s VAE compresses time by {VIDEO_KINDS[m.kind]}, so "
                          f"frames - 1 must be a multiple of it (e.g. 33 or 81)")
    if m.kind != "digits" and not m.path:
        raise ConfigError(f"model.path is empty: give a diffusers folder or hub id for model.kind={m.kind}")
    parts = [p.strip() for p in cfg.reward.name.split("+")]
    model_rewards = [p for p in parts if p in _Owned("awm_fast.rewards:NOT_FOR_DIGITS")]
    if m.kind == "digits" and model_rewards:
        raise ConfigError(f"reward.name={cfg.reward.name!r}: {model_rewards[0]} does not apply to model.kind=digits "
                          f"(8x8 digits; use digits, jpeg_* or your own import path)")
    if m.kind != "digits" and "digits" in parts:
        raise ConfigError("reward.name=digits needs model.kind=digits")
    if cfg.reward.weights and len(cfg.reward.weights) != len(parts):
        raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} values for the {len(parts)} parts of "
                          f"reward.name={cfg.reward.name!r}")
    if t.finetune == "full" and (t.shared_batch is True or t.eval_ema or s.cuda_graphs is True):  # auto: off there
        key = "train.shared_batch" if t.shared_batch is True else "train.eval_ema" if t.eval_ema else "sample.cuda_graphs"
        raise ConfigError(f"{key}=true needs train.finetune=lora (LoRA routing / a LoRA shadow / graphs without FSDP "
                          "collectives); set it to false for train.finetune=full")
    if (m.fp8 or m.merged_lora) and t.finetune != "lora":
        key = "model.fp8" if m.fp8 else "model.merged_lora"
        raise ConfigError(f"{key}=true acts on the frozen base under LoRA; train.finetune={t.finetune!r} has none")
    if m.fp8 and m.dtype != "bfloat16":
        raise ConfigError(f"model.fp8=true needs model.dtype=bfloat16 (the float8 GEMMs write bf16), got {m.dtype!r}")
    if m.fp8 and m.merged_lora:
        raise ConfigError("model.merged_lora=true with model.fp8=true would round the LoRA delta to float8 (2^-3 "
                          "relative spacing); use one of the two")
    if not m.lora_targets:
        raise ConfigError("model.lora_targets is empty: name the modules that carry LoRA")
