"""The run folder: created (one line when run.output_dir is a file), held by one process at a time, and never
rewritten by a resume that continues something else than its newest state.

    lock:    `<run>/.lock` holds "pid host" under an exclusive flock while a process trains into the folder; a
             second process is refused with one line naming the holder's pid (RunLocked); the kernel drops the
             flock of a process that died, so a stale lock (a dead pid) is simply taken over
    resume:  in place when the checkpoint is its run's newest and run.name / run.output_dir are unchanged;
             otherwise (an older checkpoint, the newest being unreadable, a new name or output folder) the run
             BRANCHES: a new folder (run.name, else `<run>-from-step_NNNNNN`, under run.output_dir) starts with a
             copy of that checkpoint (its config.yaml the resumed config) and `resumed_from.json` naming its parent;
             the original folder is left byte-for-byte
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from awm_fast.config import Config
from awm_fast.state_file import DISK_FULL, disk_full, fsync_dir, fsync_tree
from awm_fast.train.checkpoint import list_checkpoints
from awm_fast.train.distributed import TrainingError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
PARENT_FILE = "resumed_from.json"  # a branch's parent: {"checkpoint", "run", "step", "reason"}


class RunFolderError(TrainingError):
    """A run folder that cannot be used (a file in its place, another process holds it, a branch exists)."""


class RunLocked(RunFolderError):
    pass


def make_run_dir(run_dir: Path) -> None:
    """mkdir -p, one line naming the path when a file stands where a folder must be."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), run_dir)
        raise RunFolderError(f"cannot create the run folder {run_dir}: {blocker} is a file, not a folder; set "
                             "run.output_dir (or run.name) to a folder") from None
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full(exc, "the run folder", run_dir.parent) from None
        raise RunFolderError(f"cannot create the run folder {run_dir}: {exc.strerror}; set run.output_dir to a "
                             "writable folder") from None


class RunLock:
    """An exclusive, non-blocking flock on `<run_dir>/.lock` (module docstring); a context manager."""

    def __init__(self, run_dir: Path) -> None:
        self.path, self.fd = Path(run_dir) / LOCK_FILE, None

    def __enter__(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "a process"
            raise RunLocked(f"run folder {self.path.parent} is in use by {who} (lock {self.path}); wait for it to "
                            "finish or stop it, or resume into another folder (run.name=NEW)") from None
        old = os.pread(fd, 200, 0).decode(errors="replace").split()
        if old and old[0] != str(os.getpid()):
            logger.info(f"[run] took over the lock of {self.path.parent} left by process {old[0]}, which ended "
                        "without releasing it")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            os.ftruncate(self.fd, 0)  # released: a pid left in the file means its holder died holding it
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


@dataclass(frozen=True)
class ResumePlan:
    """Where a resumed run goes on. parent None: in place, in ckpt's own run folder; else a branch: run_dir is a
    new folder continuing from `parent` (a checkpoint of another run folder), for `reason`."""

    ckpt: Path
    run_dir: Path
    parent: Path | None = None
    reason: str = ""


def plan_resume(ckpt: Path, saved: Config, cfg: Config) -> ResumePlan:
    """In place or a branch (module docstring); `saved`: the checkpoint's config, `cfg`: the one resumed with."""
    ckpt = Path(ckpt)
    run_dir = ckpt.parent.parent
    found = list_checkpoints(run_dir)
    older = bool(found) and found[-1] != ckpt
    renamed = bool(cfg.run.name) and cfg.run.name != saved.run.name
    moved = cfg.run.output_dir != saved.run.output_dir
    reasons = [f"{ckpt.name} is not the newest checkpoint of {run_dir} ({found[-1].name})"] if older else []
    reasons += [f"run.name {saved.run.name!r} -> {cfg.run.name!r}"] if renamed else []
    reasons += [f"run.output_dir {saved.run.output_dir!r} -> {cfg.run.output_dir!r}"] if moved else []
    branch = f"{run_dir.name}-from-{ckpt.name}"
    target = (Path(cfg.run.output_dir) if moved else run_dir.parent) / (
        cfg.run.name if renamed else branch if older else run_dir.name)
    if target.resolve() == run_dir.resolve():  # the same folder after all (e.g. the name of a timestamped run)
        if not older:
            return ResumePlan(ckpt, run_dir)
        target = run_dir.parent / branch
    return ResumePlan(ckpt, target, ckpt, "; ".join(reasons))


def start_branch(plan: ResumePlan, cfg: Config) -> Path:
    """Fill the branch folder (created and locked by the caller): a copy of the parent checkpoint whose
    config.yaml is `cfg` (what a bare `--resume` of the branch continues with) and PARENT_FILE. Returns the
    copy (the checkpoint to restore). A branch folder that already holds anything is refused."""
    run_dir, parent = plan.run_dir, plan.parent
    if any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        raise RunFolderError(f"cannot continue {parent} in {run_dir}: that folder exists already; resume it with "
                             f"`awm-fast train --resume {run_dir}`, or choose another run.name")
    folder = run_dir / "checkpoints"
    folder.mkdir()
    tmp, copy = folder / f".tmp_{parent.name}_{os.getpid()}", folder / parent.name
    try:
        shutil.copytree(parent, tmp, ignore=shutil.ignore_patterns(".*"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        fsync_tree(tmp)
        os.replace(tmp, copy)
        fsync_dir(folder)
        step = int(parent.name.rpartition("_")[2])
        (run_dir / PARENT_FILE).write_text(json.dumps({"checkpoint": str(parent.resolve()), "run": str(
            parent.parent.parent.resolve()), "step": step, "reason": plan.reason}, indent=2) + "\n")
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)  # the branch folder is left as empty as it was: retry it
        if exc.errno in DISK_FULL:
            raise disk_full(exc, f"a copy of {parent}", folder) from None
        raise
    logger.info(f"[resume] {plan.reason}: continuing in a new run folder {run_dir} (its parent, {parent}, is "
                f"left as it is)")
    return copy


def lineage(run_dir: Path) -> dict:
    """{"resumed_from": parent checkpoint} for a branch's summary, {} otherwise."""
    path = Path(run_dir) / PARENT_FILE
    return {"resumed_from": json.loads(path.read_text())["checkpoint"]} if path.is_file() else {}


def open_run_folder(cfg: Config, resume: str | Path | None, d, held) -> tuple[Path, Path | None, Config]:
    """(run folder, checkpoint to restore or None, config to run with) of `train(cfg, resume=...)`, every rank
    agreeing: the checkpoint resolved, checked resumable and readable (weights_only) before any work; rank 0
    creates and locks the folder (the lock released by the ExitStack `held`) and fills a branch. Errors are
    the same one line on every rank."""
    import copy
    import dataclasses
    from datetime import datetime

    from awm_fast.train.checkpoint import check_readable, resolve_checkpoint
    from awm_fast.train.resume import build_config, check_resumable, config_changes, saved_config

    plan = None
    if resume:
        ckpt = resolve_checkpoint(resume)
        saved = build_config(*saved_config(ckpt))
        check_resumable(config_changes(saved, cfg))  # the Python API's check (the CLI lists every change first)
        check_readable(ckpt)  # a damaged file, or one that would run code, is one line before any work
        plan = d.broadcast_object(plan_resume(ckpt, saved, cfg))
        run_dir = plan.run_dir
        if plan.parent is not None:
            cfg = copy.deepcopy(cfg)
            cfg.run = dataclasses.replace(cfg.run, name=run_dir.name, output_dir=str(run_dir.parent))
    else:
        name = cfg.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.run.output_dir) / d.broadcast_object(name)
    error, restore = None, plan.ckpt if plan else None
    if d.is_main:
        try:
            make_run_dir(run_dir)
            held.enter_context(RunLock(run_dir))
            if plan is not None and plan.parent is not None:
                restore = start_branch(plan, cfg)
        except (RunFolderError, OSError) as exc:
            error = exc
    error, restore = d.broadcast_object((error, restore), "agreeing on the run folder")
    if error is not None:
        raise error
    return run_dir, restore, cfg
