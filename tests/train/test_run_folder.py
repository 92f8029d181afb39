"""The run folder (awm_fast/train/run_folder.py): one process at a time (a second is refused naming the holder's
pid; a dead holder's lock is taken over), a resume from anything but the newest checkpoint or into a new
name / output folder branches into a new folder that records its parent and leaves the original byte-for-byte,
and a folder that cannot be used, a full disk or a checkpoint that would run code is one line."""
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from awm_fast.cli import main
from awm_fast.config import load_config
from awm_fast.train.resume import NothingToResume, resume_config
from awm_fast.train.run_folder import LOCK_FILE, PARENT_FILE, RunLock, RunLocked, plan_resume
from tests.test_state_file import Touch
from tests.train.hooked_cli import REPO, hooked_env
from tests.train.test_faults import TINY
from tests.train.test_resume_config import _fake_run


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes (folders as b"<dir>")."""
    return {str(p.relative_to(folder)): b"<dir>" if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


class Holder:
    """Another process holding the run folder's lock until stopped."""

    def __init__(self, run: Path) -> None:
        code = textwrap.dedent(f"""
            import sys, time
            from awm_fast.train.run_folder import RunLock
            with RunLock({str(run)!r}):
                print("held", flush=True)
                time.sleep(120)
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                     env=hooked_env(), cwd=REPO)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_second_process_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    holder = Holder(tmp_path)
    try:
        with pytest.raises(RunLocked, match=rf"^run folder {tmp_path} is in use by process {holder.proc.pid} on "):
            with RunLock(tmp_path):
                pass
    finally:
        holder.stop()
    assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(holder.proc.pid)  # left behind by a killed holder
    caplog.set_level(logging.INFO, logger="awm_fast")
    with RunLock(tmp_path):  # stale: its holder is dead
        assert caplog.messages == [f"[run] took over the lock of {tmp_path} left by process {holder.proc.pid}, "
                                   "which ended without releasing it"]
        assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunLocked, match=f"in use by process {os.getpid()}"):  # even from this same process
            with RunLock(tmp_path):
                pass
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released on exit: no pid left behind
    with RunLock(tmp_path):
        pass


def test_a_concurrent_resume_is_refused_with_one_line_and_changes_nothing(tmp_path, capsys):
    _, run = _fake_run(tmp_path)
    holder = Holder(run)
    try:
        before = _snapshot(run)
        assert main(["train", "--resume", str(run)]) == 1
    finally:
        holder.stop()
    line = _one_line(capsys)
    assert line.startswith(f"awm-fast: error: run folder {run} is in use by process {holder.proc.pid}"), line
    assert _snapshot(run) == before


def _plan(run, ckpt_name, *overrides):
    saved = load_config(None, [*TINY, f"run.output_dir={run.parent}", "run.name=r", "train.steps=6"])
    cfg = load_config(None, [*TINY, f"run.output_dir={run.parent}", "run.name=r", "train.steps=6", *overrides])
    return plan_resume(run / "checkpoints" / ckpt_name, saved, cfg)


def test_which_resumes_go_on_in_place_and_which_branch(tmp_path):
    _, run = _fake_run(tmp_path)  # r/checkpoints/step_000003
    older = run / "checkpoints" / "step_000001"
    older.mkdir()
    torch.save({"step": 1}, older / "state.pt")
    plan = _plan(run, "step_000003", "train.steps=9", "train.lr=0.5")  # the newest, any resumable change
    assert plan.run_dir == run and plan.parent is None
    plan = _plan(run, "step_000001")
    assert plan.run_dir == tmp_path / "r-from-step_000001" and plan.parent == older
    assert plan.reason == f"step_000001 is not the newest checkpoint of {run} (step_000003)"
    plan = _plan(run, "step_000003", "run.name=other")
    assert plan.run_dir == tmp_path / "other" and plan.reason == "run.name 'r' -> 'other'"
    plan = _plan(run, "step_000001", "run.name=other")
    assert plan.run_dir == tmp_path / "other" and plan.reason.endswith("(step_000003); run.name 'r' -> 'other'")
    plan = _plan(run, "step_000003", f"run.output_dir={tmp_path / 'elsewhere'}")
    assert plan.run_dir == tmp_path / "elsewhere" / "r" and plan.parent == run / "checkpoints" / "step_000003"


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert main(["train", *TINY, f"run.output_dir={tmp_path / 'out'}", "run.name=x"]) == 1
    assert _one_line(capsys) == (f"awm-fast: error: cannot create the run folder {tmp_path / 'out' / 'x'}: "
                                 f"{tmp_path / 'out'} is a file, not a folder; set run.output_dir (or run.name) to "
                                 "a folder")


def test_a_resume_whose_every_checkpoint_is_unreadable_is_one_line(tmp_path, capsys):
    _, run = _fake_run(tmp_path)
    (run / "checkpoints" / "step_000003" / "state.pt").write_bytes(b"\x00" * 64)
    assert main(["train", "--resume", str(run)]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"awm-fast: error: no readable checkpoint in {run}: checkpoint state ") and \
        "not a torch.save archive" in line


# --- real tiny runs: a 2-step run with a checkpoint after each step, shared by the tests below ---------------------

@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", *TINY, f"run.output_dir={out}", "run.name=base", "train.steps=2",
                 "run.checkpoint_every=1"]) == 0
    run = out / "base"
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000001", "step_000002"]
    return run


def _copy_run(base: Path, where: Path, name: str) -> Path:
    run = where / name
    shutil.copytree(base, run)
    for path in (run / "config.yaml", *run.glob("checkpoints/*/config.yaml")):  # its own output folder
        path.write_text(path.read_text().replace(str(base.parent), str(where)).replace("name: base", f"name: {name}"))
    return run


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_resuming_an_older_checkpoint_branches_and_leaves_the_original_byte_for_byte(base_run, tmp_path, capsys):
    run = _copy_run(base_run, tmp_path, "r")
    before = _snapshot(run)
    older = run / "checkpoints" / "step_000001"
    capsys.readouterr()
    assert main(["train", "--resume", str(older), "train.lr=0.02"]) == 0
    out = capsys.readouterr().out
    branch = tmp_path / "r-from-step_000001"
    assert f"continuing in a new run folder {branch} (its parent, {older}, is left as it is)" in out
    assert _snapshot(run) == before  # the original: every byte, its checkpoints, metrics and config
    assert json.loads((branch / PARENT_FILE).read_text())["checkpoint"] == str(older)
    assert json.loads((branch / "summary.json").read_text())["resumed_from"] == str(older)
    assert [r["step"] for r in _rows(branch)] == [1, 2] and _rows(branch)[0] == _rows(run)[0]
    assert (branch / "checkpoints" / "step_000002").is_dir() and "lr: 0.02" in (branch / "config.yaml").read_text()
    with pytest.raises(NothingToResume, match="step_000002 is complete"):  # a bare resume of the original: its
        resume_config(run)                                                # own newest, complete: nothing to do
    cfg, changes, ckpt = resume_config(run, ["train.steps=4"])  # longer: its own newest, its own config
    assert ckpt == run / "checkpoints" / "step_000002" and [str(c) for c in changes] == ["train.steps 2 -> 4"] \
        and cfg.train.lr != 0.02


@pytest.mark.slow
def test_a_new_name_or_an_unreadable_newest_checkpoint_branches_saying_so(base_run, tmp_path, capsys):
    run = _copy_run(base_run, tmp_path, "r")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "run.name=other"]) == 0  # the newest, 2 of 2 steps: no training
    assert _snapshot(run) == before
    other = tmp_path / "other"
    assert json.loads((other / "summary.json").read_text())["resumed_from"] == str(run / "checkpoints" / "step_000002")
    assert "name: other" in (other / "config.yaml").read_text()
    assert main(["train", "--resume", str(run), "run.name=other"]) == 1  # again: the branch exists
    assert _one_line(capsys).startswith(f"awm-fast: error: cannot continue {run / 'checkpoints' / 'step_000002'} in "
                                        f"{other}: that folder exists already; resume it with `awm-fast train "
                                        f"--resume {other}`")

    newest = run / "checkpoints" / "step_000002" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0  # bare
    out = capsys.readouterr().out
    assert f"[warn] the newest checkpoint of {run} cannot be read (checkpoint state {newest} is not a torch.save " \
           f"archive" in out
    assert f"falling back to the newest readable one, {run / 'checkpoints' / 'step_000001'}" in out
    assert _snapshot(run) == before and (tmp_path / "r-from-step_000001" / "checkpoints" / "step_000002").is_dir()


@pytest.mark.slow
def test_a_crafted_checkpoint_runs_nothing_under_train_resume_and_eval(base_run, tmp_path, capsys):
    run = _copy_run(base_run, tmp_path, "r")
    marker, state = tmp_path / "ran", run / "checkpoints" / "step_000002" / "state.pt"
    torch.save({**torch.load(state, weights_only=True), "payload": Touch(marker)}, state)
    capsys.readouterr()
    for argv, code in ((["train", "--resume", str(state.parent)], 1),  # a run folder would fall back to step 1
                       (["eval", str(state.parent), "--out", str(tmp_path / "eval"), "--num-prompts", "1"], 1)):
        assert main(argv) == code, argv
        line = _one_line(capsys)
        assert line.startswith(f"awm-fast: error: checkpoint state {state} is unreadable (it holds objects beyond "
                               f"tensors and plain containers (") and "refused: loading it could run code" in line
        assert not marker.exists(), argv


@pytest.mark.slow
def test_a_full_disk_while_branching_is_one_line_and_can_be_retried(base_run, tmp_path, capsys, monkeypatch):
    run = _copy_run(base_run, tmp_path, "r")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copytree", disk_full)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "run.name=other"]) == 1
    line = _one_line(capsys)
    assert line.startswith(f"awm-fast: error: No space left on device writing a copy of {run}/checkpoints/"
                           "step_000002 to ") and "free space or point run.output_dir at another disk" in line
    assert [p.name for p in (tmp_path / "other").iterdir()] == [LOCK_FILE]  # nothing half-written is left
