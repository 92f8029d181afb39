"""Clean stops: SIGTERM (how schedulers preempt a job) and SIGINT (Ctrl-C) end a run at the next step boundary,
checkpointed, with the command that resumes it.

The first signal only sets a flag (`StopRequest`). After each step's bookkeeping the trainer asks `agreed`:
on several processes an all-reduce (MAX) of the flag, so every rank stops after the same step even when only one
was signalled; on one process a plain flag read. A stopping run writes the checkpoint of that step (unless the
step's periodic one was just written) and raises `Stopped`; the command line prints one line naming the resume
command, `awm-fast train --resume <run dir>`, and exits with 128 + the signal's number (130 SIGINT, 143 SIGTERM).
A signal during the setup or the first evaluation stops after the first step; one during the final evaluation lets
the run finish (the last step's checkpoint is written already).

A second signal exits at once (os._exit, the same code): the checkpoints already published stay intact (they are
written to a temporary folder and renamed, train/checkpoint.py). Under torchrun a repeat of the same signal within `REPEAT_S`
of the first is that request delivered again (a terminal's Ctrl-C reaches the agent and its workers, and the agent
forwards it, seconds late on a loaded machine) and is ignored; one after that exits at once. torchrun kills workers that have not exited `--shutdown-timeout` seconds
(default 30) after it forwarded a signal: give it a step and a checkpoint's time.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_S = 10.0  # under torchrun: a repeat this soon after the first signal is the same request, forwarded


def resume_command(run_dir: Path) -> str:
    return f"awm-fast train --resume {shlex.quote(str(Path(run_dir).resolve()))}"


class Stopped(Exception):
    """The run stopped at a step boundary on a signal; its checkpoint of `step` is in `run_dir`."""

    def __init__(self, signum: int, run_dir: Path, step: int) -> None:
        self.signum, self.run_dir, self.step = signum, Path(run_dir), step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step} (checkpoint written); "
                         f"resume with: {resume_command(run_dir)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The flag a SIGTERM / SIGINT sets (`signum`, None until one came); `run_dir`: named by the second signal's
    exit line once known."""

    def __init__(self, forwarded_repeats: bool = False) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self.forwarded_repeats = forwarded_repeats  # torchrun: ignore a repeat within REPEAT_S (module docstring)
        self.run_dir: Path | None = None
        self.stopping = False  # set by `agreed` once the ranks agreed to stop

    def handle(self, signum: int, frame=None) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
            print(f"[stop] {name}: stopping after this step, with a checkpoint; send it again to exit at once",
                  file=sys.stderr, flush=True)
            return
        if self.forwarded_repeats and signum == self.signum and time.monotonic() - self.first_at < REPEAT_S:
            return
        hint = f"; resume from the last checkpoint with: {resume_command(self.run_dir)}" if self.run_dir else ""
        print(f"awm-fast: second {name}: exiting at once{hint}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def agreed(self, d) -> bool:
        """Whether any rank was signalled (on several processes a collective: every rank calls it at the same step
        boundary). A rank that was not signalled takes the signal of the first rank that was."""
        if not d.any(self.signum is not None, "agreeing on a stop (SIGTERM / SIGINT)"):
            return False
        if d.enabled:
            self.signum = next(s for s in d.all_gather_object(self.signum, "sharing the stop signal") if s)
        self.stopping = True
        return True

    def stopped(self, run_dir: Path, step: int) -> Stopped:
        return Stopped(self.signum, run_dir, step)


@contextlib.contextmanager
def stop_on_signals(forwarded_repeats: bool | None = None):
    """A StopRequest handling SIGINT and SIGTERM inside the block (the previous handlers are put back after it).
    Off the main thread, where Python cannot install handlers, the request never fires."""
    if forwarded_repeats is None:
        forwarded_repeats = "TORCHELASTIC_RUN_ID" in os.environ
    request = StopRequest(forwarded_repeats)
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
