"""Time grids for sampling and stratified training timesteps.

Sampling grid = the model's own scheduler grid, diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(N)`
(what the official code samples with), N + 1 decreasing sigmas ending in 0:
- static shift s (SD3 / SD3.5, s = 3; the digits task with sample.shift), shift(u) = s u / (1 + (s - 1) u):
  sigma_min = shift(1 / 1000) (the training sigmas are shifted once at construction),
  sigma_i = shift(linspace(1, sigma_min, N)_i) (shifted again), then 0.
  SD3.5, N = 14: 1, .97306, ..., .35737, .20620, .00893, 0.
- dynamic shifting (FLUX): sigma_i = e^mu / (e^mu + (1 / u_i - 1)), u = linspace(1, 1 / N, N), then 0, with
  mu = m L + b from the image sequence length L (the pipeline's calculate_shift over the scheduler config's
  base/max sequence lengths and shifts).
- static shift on the pipeline's own input sigmas (Z-Image; FLUX.1-schnell, shift 1): sigma_i =
  shift(linspace(1, 1 / N, N)_i), then 0. FluxPipeline always passes linspace(1, 1 / N, N) (`linear_input_sigmas`),
  so schnell steps through 1, .75, .5, .25, 0 at N = 4, not the scheduler's own set_timesteps(N) grid.
- flow sigmas (UniPCMultistepScheduler / DPMSolverMultistepScheduler with use_flow_sigmas: Wan), flow_shift s:
  sigma_i = shift(linspace(1, 1 / 1000, N + 1)_i) for i < N, then 0; the scheduler nudges sigma_0 to 1 - 1e-6
  (its multistep update takes log sigma), read here as 1, where every rollout starts.
`scheduler_grid` reads the grid off a loaded pipeline's scheduler (the source of truth; `pipeline_sigmas`: the
families' grid function from it); `sd3_grid` and `dynamic_grid` are the float64 transcriptions.

Training timesteps (T per sample) as the official script draws them:
- discrete_wo_init: boundaries b = int(linspace(1, floor(N f), T + 1)); index k_j ~ U{b_j, ..., b_{j+1} - 1};
  t_j = sigma_{k_j} of the rollout grid (f = timestep_fraction, 0.9 officially). One draw per micro-batch.
- discrete: the same with boundaries starting at 0 (t = 1 allowed): the official PickScore preset.
- uniform: per sample, T strata of [0.2, 1]: u_jb = 0.2 + 0.8 (j + U_jb) / T, the T values of each sample
  shuffled, then shifted (shift = sample.shift, the official time_shift 3).
- logit_normal: T stratified standard-normal quantiles n_j = Phi^-1((j + U_j) / T), shuffled, t = shift(sigmoid(n)),
  clamped >= 0.01; one draw per micro-batch.
The uniforms U come from the micro-batch's generator on its device and every step stays there (float64): no
copy to the host and no host data copied in (the discrete strata's bounds are built once per device), so a
micro-batch runs without a device synchronisation. Each elementwise step is the same float64 operation as the
official formula (Phi^-1(q) = sqrt(2) erfinv(2 q - 1), torch's Normal(0, 1).icdf), so CPU draws are unchanged.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from awm_fast.config import Config

logger = logging.getLogger(__name__)

TIMESTEP_MODES = ("discrete_wo_init", "discrete", "uniform", "logit_normal")
NUM_TRAIN_TIMESTEPS = 1000  # diffusers' FlowMatchEulerDiscreteScheduler default, the SD3 / FLUX schedulers'
FLOW_SIGMA_NUDGE = 1e-5  # how far below 1 a `use_flow_sigmas` scheduler may start (float32 1 - 1e-6) and read as 1


def shift_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma = s u / (1 + (s - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def sd3_grid(num_steps: int, shift: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The N + 1 sigmas of a static-shift scheduler: shift(linspace(1, shift(1/1000), N)), then 0."""
    _check_steps(num_steps)
    sigma_min = shift_time(torch.tensor(1 / NUM_TRAIN_TIMESTEPS, dtype=torch.float64), shift)
    sigmas = shift_time(torch.linspace(1, float(sigma_min), num_steps, dtype=torch.float64), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


time_grid = sd3_grid  # the grid of the digits task and of any SD3-style scheduler


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """mu = m L + b, the line through (base_seq_len, base_shift) and (max_seq_len, max_shift)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def dynamic_grid(num_steps: int, mu: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The N + 1 sigmas of a dynamically shifted scheduler: e^mu / (e^mu + 1/u - 1), u = linspace(1, 1/N, N)."""
    _check_steps(num_steps)
    u = torch.linspace(1, 1 / num_steps, num_steps, dtype=torch.float64)
    sigmas = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


def linear_input_sigmas(num_steps: int) -> list[float]:
    """linspace(1, 1/N, N), the sigmas FluxPipeline / Flux2KleinPipeline pass to set_timesteps (before shifting)."""
    _check_steps(num_steps)
    return torch.linspace(1, 1 / num_steps, num_steps, dtype=torch.float64).tolist()


def scheduler_grid(scheduler, num_steps: int, image_seq_len: int | None = None, input_sigmas=None,
                   mu: float | None = None) -> torch.Tensor:
    """The N + 1 sigmas (float64) that `scheduler.set_timesteps(N)` builds, as the diffusers pipeline calls it:
    with dynamic shifting (FLUX), sigmas = linspace(1, 1/N, N) and mu from `image_seq_len` and the config, or
    `mu` as given (FLUX.2: families.flux2.empirical_mu, which depends on N too).
    `input_sigmas(N)`: the sigmas the pipeline itself passes to set_timesteps, with or without dynamic shifting
    (Z-Image: linspace(1, 1/N, N) under a static shift). The scheduler itself is not modified (a copy is set)."""
    _check_steps(num_steps)
    sched = copy.deepcopy(scheduler)
    config = sched.config
    if config.get("use_dynamic_shifting", False):
        if image_seq_len is None and mu is None:
            raise ValueError("a dynamically shifted scheduler (FLUX) needs the image sequence length for mu")
        if mu is None:
            mu = flux_mu(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = list((input_sigmas or linear_input_sigmas)(num_steps))
        sched.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
    elif input_sigmas is not None:
        sched.set_timesteps(num_steps, sigmas=list(input_sigmas(num_steps)))
    else:
        sched.set_timesteps(num_steps)
    sigmas = sched.sigmas.to(torch.float64).cpu()
    if config.get("use_flow_sigmas", False) and abs(float(sigmas[0]) - 1) < FLOW_SIGMA_NUDGE:
        sigmas[0] = 1.0  # UniPC / DPM-Solver flow sigmas start at 1 - 1e-6 (their own update takes log sigma)
    if sigmas.numel() != num_steps + 1 or sigmas[0] != 1 or sigmas[-1] != 0:
        raise ValueError(f"scheduler {type(scheduler).__name__} gave sigmas {sigmas.tolist()} for {num_steps} steps: "
                         "expected N + 1 values from 1 down to 0")
    return sigmas


def discrete_boundaries(num_steps: int, num_timesteps: int, fraction: float, with_init: bool) -> list[int]:
    """Stratum boundaries over the grid indices; raises ValueError when a stratum would be empty."""
    start = 0 if with_init else 1
    stop = math.floor(num_steps * fraction)
    bounds = torch.linspace(start, stop, num_timesteps + 1, dtype=torch.float64).to(torch.int64).tolist()
    if any(b1 <= b0 for b0, b1 in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{num_timesteps} strata do not fit in grid indices [{start}, {stop}) (boundaries {bounds})")
    return bounds


def _rand(shape, generator: torch.Generator) -> torch.Tensor:
    """Uniforms (float64) drawn on the generator's device (a CUDA generator on GPU runs), left there."""
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=generator.device)


@functools.lru_cache(maxsize=64)
def _strata(num_steps: int, num_timesteps: int, fraction: float, with_init: bool,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower bounds, widths) of the discrete strata (`discrete_boundaries`) as int64 tensors on `device`,
    computed and copied there once."""
    b = torch.tensor(discrete_boundaries(num_steps, num_timesteps, fraction, with_init), dtype=torch.int64,
                     device=device)
    return b[:-1], b[1:] - b[:-1]


def _shuffled(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """values (T, ...) with the T entries of each column in a random order (argsort of uniforms)."""
    return torch.gather(values, 0, _rand(values.shape, generator).argsort(dim=0))


def sample_train_timesteps(mode: str, num_timesteps: int, grid: torch.Tensor, *, shift: float, fraction: float,
                           generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
    """Training times (float64, in (0, 1]) for one micro-batch, on the generator's device: (T,) shared by its
    samples, or with `batch` given (T, batch), column b = sample b's times (only `uniform` draws them per
    sample). `grid` on that device too keeps the call free of copies (a CPU grid is copied per call)."""
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"timestep_sampling={mode!r} is not one of {TIMESTEP_MODES}")
    T, device = num_timesteps, generator.device
    if mode in ("discrete_wo_init", "discrete"):
        lower, width = _strata(grid.numel() - 1, T, fraction, mode == "discrete", device)
        idx = lower + (_rand(T, generator) * width).to(torch.int64)
        t = grid.to(device, torch.float64)[idx]
    elif mode == "uniform":
        u = (torch.arange(T, dtype=torch.float64, device=device)[:, None] + _rand((T, batch or 1), generator)) / T
        t = shift_time(_shuffled(0.2 + 0.8 * u, generator), shift)
        return t if batch else t[:, 0]
    else:
        q = (torch.arange(T, dtype=torch.float64, device=device) + _rand(T, generator)) / T
        n = torch.erfinv(2 * q.clamp(1e-7, 1 - 1e-7) - 1) * math.sqrt(2)  # Normal(0, 1).icdf, op for op
        t = shift_time(torch.sigmoid(_shuffled(n, generator)), shift).clamp(min=0.01)
    return t if batch is None else t[:, None].expand(T, batch).clone()


def pipeline_sigmas(scheduler, cfg: Config, image_seq_len: int | None = None):
    """sigmas(N) of the pipeline's own scheduler (`scheduler_grid`); says when sample.shift, which
    then only shifts the continuous training timesteps, differs from the scheduler's shift."""
    shift = scheduler.config.get("shift", 1.0)
    if not scheduler.config.get("use_dynamic_shifting", False) and shift != cfg.sample.shift:
        logger.info(f"[grid] the rollout grid is the scheduler's (shift {shift}); sample.shift={cfg.sample.shift} only "
                    "shifts the uniform / logit_normal training timesteps")
    return functools.partial(scheduler_grid, scheduler, image_seq_len=image_seq_len)
