"""Failures the trainer turns into one clear line instead of a crash dump or a hang.

- a reward that raises (a flaky server, a network file system) is retried `reward.retries` times, then the run
  stops naming the reward and the last error (ValueError/TypeError are bugs or bad input: never retried). This is
  the ONE retry layer: the HTTP and GenEval clients do not retry themselves;
- a reward call that has not returned after `reward.timeout_s` stops the run with one line (not retried: the hung
  call may still be running). Worst case of a failing reward, per call:
      (reward.retries + 1) x reward.timeout_s + retry_wait_s x (2^reward.retries - 1)
  (defaults: 3 x 300 s + 15 s; a dead HTTP server: its client's timeout_s, 120 s, per try: 3 x 120 + 15 = 375 s,
  and `check_reward_servers` finds it in seconds at start-up, before anything is loaded);
- `train.max_nonfinite_steps` steps in a row with a non-finite loss or gradient stop the run (each one alone
  is skipped with a warning: algorithms.update_loop.finish_step);
- CUDA out-of-memory stops with the config keys that reduce memory;
- `run_event`: named points of a run (EVENT_HOOKS) where observers, e.g. a test that SIGKILLs there, hook in.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

import torch

from awm_fast.train.distributed import TrainingError

logger = logging.getLogger(__name__)


class RewardFailed(TrainingError):
    pass


class RewardTimeout(TrainingError):
    pass


class NonFiniteSteps(TrainingError):
    pass


def check_reward_servers(name: str, options: dict, timeout_s: float = 5.0) -> None:
    """The reward servers of a reward config answer (rewards.http.check_servers), checked within seconds before
    anything expensive (model, prompt encodings, run folder); RewardFailed in one line otherwise."""
    from awm_fast.rewards.http import RewardServerError, check_servers

    try:
        check_servers(name, options, timeout_s)
    except RewardServerError as exc:
        raise RewardFailed(str(exc)) from None


class _CallThread:
    """A daemon thread that runs the calls handed to it, one at a time. A call that never returns keeps it busy
    (and, being a daemon, it never holds up the process's exit)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name="reward-call", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, box, done = self.jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
                box.append((False, exc))
            done.set()

    def submit(self, fn) -> tuple[list, threading.Event]:
        box, done = [], threading.Event()
        self.jobs.put((fn, box, done))
        return box, done


class OutOfMemory(TrainingError):
    pass


class RetryingReward:
    """Calls `reward`, retrying up to `retries` times (waiting `wait_s`, doubling) on errors other than
    ValueError/TypeError/out-of-memory; then raises RewardFailed. With `timeout_s`, each call runs on a daemon
    thread and one that has not returned after timeout_s raises RewardTimeout (never retried)."""

    def __init__(self, reward, retries: int = 2, wait_s: float = 5.0, timeout_s: float | None = None) -> None:
        self.reward, self.retries, self.wait_s, self.timeout_s = reward, retries, wait_s, timeout_s
        self.name = getattr(reward, "name", type(reward).__name__)
        self._idle: list[_CallThread] = []
        self._lock = threading.Lock()

    def _call(self, images, prompts, metadata):
        """reward(...) within timeout_s, on a thread (grad / inference mode, the CUDA device and torch's CPU thread
        count carried over from the caller: all are per thread, and the thread count changes CPU float results)."""
        if not self.timeout_s:
            return self.reward(images, prompts, metadata)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        threads = torch.get_num_threads()

        def call():
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
            if cuda is not None:
                torch.cuda.set_device(cuda)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return self.reward(images, prompts, metadata)

        with self._lock:
            worker = self._idle.pop() if self._idle else _CallThread()
        box, done = worker.submit(call)
        if not done.wait(self.timeout_s):  # the worker stays with its hung call; the next call gets a new one
            raise RewardTimeout(f"reward {self.name!r} did not return within reward.timeout_s={self.timeout_s:g} s "
                                "(a hung reward model, server or plug-in); the run stops (a hung call is not retried)")
        with self._lock:
            self._idle.append(worker)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def __call__(self, images, prompts, metadata):
        wait = self.wait_s
        for attempt in range(self.retries + 1):
            try:
                return self._call(images, prompts, metadata)
            except (ValueError, TypeError, torch.OutOfMemoryError, RewardTimeout):
                raise
            except Exception as exc:  # noqa: BLE001 - anything else may be transient (network, server, files)
                last = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                if attempt == self.retries:
                    raise RewardFailed(f"reward {self.name!r} failed {self.retries + 1} times in a row, last error "
                                       f"{last[:300]}; check the reward model/server (reward.retries="
                                       f"{self.retries} retries)") from exc
                logger.warning(f"[warn] reward {self.name!r} failed ({last[:200]}); retry {attempt + 1}/{self.retries} "
                               f"in {wait:g} s")
                time.sleep(wait)
                wait *= 2

    def __getattr__(self, name):  # the wrapped reward's other attributes (only called for missing ones)
        if name == "reward":
            raise AttributeError(name)
        return getattr(self.reward, name)


MEMORY_KNOBS = ("train.micro_batch (fewer rows per backward)", "sample.batch_size (fewer images per rollout batch)",
                "train.gradient_checkpointing=true", "model.dtype=bfloat16", "train.num_timesteps (rows = micro_batch x num_timesteps)",
                "model.resolution")


def out_of_memory(phase: str, exc: BaseException, device: torch.device) -> OutOfMemory:
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    return OutOfMemory(f"out of memory on {device} during {phase}{peak}; reduce memory with: "
                       + "; ".join(MEMORY_KNOBS) + f" ({str(exc).strip().splitlines()[0][:200] if str(exc) else ''})")


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) steps; raises after `limit` in a row (0: never)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def update(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning(f"[warn] step {step}: non-finite loss or gradient, optimizer step skipped "
                       f"({self.in_a_row} in a row{f', stopping at {self.limit}' if self.limit else ''})")
        if self.limit and self.in_a_row >= self.limit:
            raise NonFiniteSteps(f"{self.in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                                 f"gradient (train.max_nonfinite_steps={self.limit}); lower train.lr, check the "
                                 "reward and the model dtype, or resume from the last checkpoint")


EVENT_HOOKS: list[Callable[[str, int], None]] = []  # hook(event, step): "update" (a step's update and EMA
# done, before its bookkeeping), "checkpoint" (a checkpoint's files written, before it is published). Empty by
# default; e.g. tests/train/hooked_cli.py parks a process there for a SIGKILL.


def run_event(name: str, step: int) -> None:
    """Call every EVENT_HOOKS entry with (name, step)."""
    for hook in EVENT_HOOKS:
        hook(name, step)
