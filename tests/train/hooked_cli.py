"""`python -m tests.train.hooked_cli ...` = `python -m awm_fast.cli ...` with the test hooks the environment asks
for (also under torchrun -m):

    AWM_FAST_GRAD_DUMP=DIR   rank 0 saves each optimizer step's all-reduced gradients to DIR/grads_NNNN.pt
                             (FSDP2's sharded gradients gathered on every rank first)
    AWM_FAST_PAUSE_AT=event:step, AWM_FAST_PAUSE_RANKS=0,1 (default all), AWM_FAST_PAUSE_MARKER=FILE,
    AWM_FAST_PAUSE_SECONDS (default 3600)
                             park the process at that run event (awm_fast.train.faults.EVENT_HOOKS: "update",
                             "checkpoint"), writing its pid to FILE first, so that a test can SIGKILL it there
    AWM_FAST_SIGNAL_AT=event:step, AWM_FAST_SIGNAL=TERM|INT, AWM_FAST_SIGNAL_RANKS=1 (default all)
                             the process sends itself that signal at that run event (a clean stop's trigger at a
                             known point: train/stop.py)

Every process started this way (the launcher and its workers) writes the stacks of all its threads to stderr on
SIGUSR1 (`kill_tree(pid, stacks_s)` sends it to a process tree before a test kills a run that hung).
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

import torch

HOOKED_CLI = "tests.train.hooked_cli"  # the module tests launch with `python -m` / `torchrun -m`
REPO = Path(__file__).resolve().parents[2]


def hooked_env() -> dict[str, str]:
    """os.environ with the repository on PYTHONPATH, so `-m tests.train.hooked_cli` imports from any cwd."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def kill_tree(pid: int, stacks_s: float = 0.0) -> None:
    """SIGKILL `pid` and every process under it: torchrun's workers too, which it starts in sessions of their own,
    out of reach of a killpg of the launcher's group. With `stacks_s` > 0, first SIGUSR1 to all of them (each hooked
    process prints its threads' stacks to its stderr) and `stacks_s` seconds for the dumps: where a run hung."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in ((signal.SIGUSR1,) if stacks_s > 0 else ()) + (signal.SIGKILL,):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        if sig == signal.SIGUSR1:
            time.sleep(stacks_s)


def grad_dump_hook(folder: str):
    count = {"n": 0}

    def hook(params) -> None:
        from awm_fast.models.full_finetune import full_grads

        grads = full_grads(params)  # every rank: FSDP2's sharded gradients are gathered
        if int(os.environ.get("RANK", "0")) != 0:
            return
        count["n"] += 1
        os.makedirs(folder, exist_ok=True)
        torch.save(grads, os.path.join(folder, f"grads_{count['n']:04d}.pt"))

    return hook


def pause_hook(spec: str):
    ranks = os.environ.get("AWM_FAST_PAUSE_RANKS")

    def hook(event: str, step: int) -> None:
        if spec != f"{event}:{step}" or (ranks and os.environ.get("RANK", "0") not in ranks.split(",")):
            return
        marker = os.environ.get("AWM_FAST_PAUSE_MARKER")
        if marker:
            Path(marker).write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("AWM_FAST_PAUSE_SECONDS", "3600")))

    return hook


def signal_hook(spec: str):
    import signal

    ranks = os.environ.get("AWM_FAST_SIGNAL_RANKS")
    signum = getattr(signal, "SIG" + os.environ.get("AWM_FAST_SIGNAL", "TERM"))

    def hook(event: str, step: int) -> None:
        if spec == f"{event}:{step}" and not (ranks and os.environ.get("RANK", "0") not in ranks.split(",")):
            os.kill(os.getpid(), signum)

    return hook


def install_hooks() -> None:
    from awm_fast.algorithms.update_loop import GRADIENT_HOOKS
    from awm_fast.train.faults import EVENT_HOOKS

    if os.environ.get("AWM_FAST_GRAD_DUMP"):
        GRADIENT_HOOKS.append(grad_dump_hook(os.environ["AWM_FAST_GRAD_DUMP"]))
    if os.environ.get("AWM_FAST_PAUSE_AT"):
        EVENT_HOOKS.append(pause_hook(os.environ["AWM_FAST_PAUSE_AT"]))
    if os.environ.get("AWM_FAST_SIGNAL_AT"):
        EVENT_HOOKS.append(signal_hook(os.environ["AWM_FAST_SIGNAL_AT"]))


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    install_hooks()
    from awm_fast.cli import main

    sys.exit(main())
