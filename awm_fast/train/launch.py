"""`awm-fast train` on every GPU of the node: when the command was not started by torchrun and `run.nproc`
resolves to more than one process, it starts them through PyTorch's own launcher (torch.distributed.run, the
elastic agent behind torchrun) with the same arguments, as

    torchrun --standalone --nproc-per-node N -m awm_fast.cli <the same argv>

would; each worker then finds torchrun's environment and runs as today. run.nproc: 0 (default) = one process per
visible GPU (CUDA_VISIBLE_DEVICES counts), 1 on a CPU device or a named GPU (run.device=cuda:K); 1 = one process
(no launcher); N > 1 = N processes (on a CPU device too, with gloo: how the tests run it). Several nodes stay `torchrun --nnodes ...` (docs/training.md).

The batch must split over the processes: P x G images per step (sample.prompts_per_step x sample.group_size)
make whole rollout batches of sample.batch_size on each of the N processes,

    P G mod (N b) = 0,

checked here before anything loads (and by the trainer under torchrun), with the nearest settings that work.
"""
from __future__ import annotations

import math
import os
import sys

from awm_fast.config import Config, ConfigError

TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")  # set for every worker torchrun starts


def under_torchrun(env=None) -> bool:
    env = os.environ if env is None else env
    return any(v in env for v in TORCHRUN_VARS)


def _nearest(candidates, target: int) -> list[int]:
    """The closest value below `target` and the closest above, from `candidates` (either may be missing)."""
    below = max((c for c in candidates if c < target), default=None)
    above = min((c for c in candidates if c > target), default=None)
    return [c for c in (below, above) if c is not None]


def split_problem(cfg: Config, world: int, max_world: int | None = None) -> str | None:
    """None when P G mod (N b) = 0 (module docstring), else one line naming the settings and the nearest ones that
    work: other sample.batch_size (dividing the per-process share, multiples of train.micro_batch), other
    sample.prompts_per_step, and other process counts up to `max_world`."""
    s, mb = cfg.sample, cfg.train.micro_batch
    images, b = s.prompts_per_step * s.group_size, s.batch_size
    if images % (world * b) == 0:
        return None
    fixes = {}
    if images % world == 0:
        share = images // world
        fixes["sample.batch_size"] = _nearest([d for d in range(mb, share + 1, mb) if share % d == 0], b)
    step = world * b // math.gcd(world * b, s.group_size)  # prompts_per_step must be a multiple of this
    fixes["sample.prompts_per_step"] = _nearest(range(step, 2 * s.prompts_per_step + step, step), s.prompts_per_step)
    limit = max_world if max_world is not None else 2 * world
    fixes["run.nproc"] = _nearest([n for n in range(1, limit + 1) if images % (n * b) == 0], world)
    listed = "; ".join(f"{key}={' or '.join(map(str, values))}" for key, values in fixes.items() if values)
    return (f"sample.prompts_per_step x sample.group_size = {s.prompts_per_step} x {s.group_size} = {images} images "
            f"per step do not split into whole rollout batches of sample.batch_size={b} over {world} processes "
            f"(needs a multiple of {world * b}); nearest settings that work: {listed}")


def plan_processes(cfg: Config, env=None, gpus: int | None = None) -> int:
    """How many processes `awm-fast train` starts on this node (1: no launcher). ConfigError for a count the node
    or the batch cannot take. `gpus`: the visible CUDA devices (counted when None)."""
    import torch

    from awm_fast.env import pick_device

    if under_torchrun(env):
        return 1  # torchrun started this process: it is one of the workers
    r = cfg.run
    try:
        device = pick_device(r.device)
    except ValueError as exc:  # run.device=cuda without a GPU
        raise ConfigError(str(exc)) from None
    if gpus is None:
        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    # run.device=cuda:K names one GPU: one process there unless run.nproc asks for more
    n = r.nproc or (gpus if device.type == "cuda" and device.index is None else 1)
    if device.type == "cuda" and n > gpus:
        raise ConfigError(f"run.nproc={r.nproc} but this node has {gpus} visible GPUs (CUDA_VISIBLE_DEVICES); one "
                          "process per GPU at most")
    if n > 1 and device.type != "cuda" and r.dist_backend == "nccl":
        raise ConfigError(f"run.nproc={n} on {device} with run.dist_backend=nccl: NCCL needs GPUs (use gloo or auto)")
    if n > 1:
        problem = split_problem(cfg, n, gpus if device.type == "cuda" else None)
        if problem:
            raise ConfigError(problem)
    return n


def _cli_module() -> str:
    """The module the workers run: awm_fast.cli, or the `python -m` module that wraps its `main` (the tests' hooked
    command line, tests/train/hooked_cli.py), so that they run what this process runs."""
    main = sys.modules["__main__"]
    spec, entry = getattr(main, "__spec__", None), getattr(main, "main", None)
    wraps = getattr(entry, "__module__", None) == "awm_fast.cli" and getattr(entry, "__name__", None) == "main"
    return spec.name if spec is not None and wraps else "awm_fast.cli"


def launch(nproc: int, argv: list[str], shutdown_s: float = 30) -> int:
    """Run `python -m awm_fast.cli <argv>` in `nproc` processes through torch.distributed.run (standalone
    rendezvous on a free local port); the exit code of the first process that failed, else 0. On SIGTERM / SIGINT
    the workers get it too and stop after their step, checkpointed (train/stop.py); those still running
    `shutdown_s` seconds later are killed."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    print(f"[launch] {nproc} processes on this node (torch.distributed.run, as torchrun --standalone "
          f"--nproc-per-node {nproc}); run.nproc=1 for one", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun sets for its workers, without its 4-line notice
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--shutdown-timeout",
                                         str(max(30, int(shutdown_s))), "--module", _cli_module(), *argv])
    try:
        run(args)
    except ChildFailedError as exc:  # each worker printed its own one-line error
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode and f.exitcode > 0]
        return codes[0] if codes else 1
    except SignalException as exc:  # SIGTERM / SIGINT: forwarded to the workers, which stop cleanly (train/stop.py)
        return 128 + int(exc.sigval)
    return 0


def maybe_launch(cfg: Config, argv: list[str] | None) -> int | None:
    """The launcher's exit code when this `train` command runs as several processes, None to run it here."""
    n = plan_processes(cfg)
    if n <= 1:
        return None
    return launch(n, list(sys.argv[1:] if argv is None else argv), cfg.run.dist_timeout_s)  # a stop's step + save
