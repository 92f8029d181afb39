"""Checkpoint folders that must never be taken for a checkpoint (a write or a cleanup cut short, a folder without
its state), the errors of resolving and loading a bad one, and the atomic save's cleanup of what a killed run
left behind (train/checkpoint.py)."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from awm_fast.train import checkpoint as ckpt


def _full_save(run, step, keep=3):
    """A checkpoint in the full fine-tuning layout (whole weights, no model needed): weights hold the step."""
    weights = {name: {"w": torch.full((3,), float(step) + (0.5 if name == "ema" else 0.0))} for name in ("default", "ema")}
    return ckpt.save_checkpoint(run, step, object(), {"optimizer": {}, "config": {"train": {"steps": 9}}}, keep, weights)


def _steps(run):
    return [int(p.name.removeprefix("step_")) for p in ckpt.list_checkpoints(run)]


def _w(path):
    return load_file(str(path / "default" / "diffusion_pytorch_model.safetensors"))["w"]


def test_only_complete_step_folders_count_in_numeric_order(tmp_path):
    folder = tmp_path / "checkpoints"
    for name, state in (("step_000002", True), ("step_000010", True), ("step_1000000", True),
                        ("step_000003", False),  # no state.pt: its write never finished
                        (".tmp_step_000011_123", True), (".trash_step_000001_5", True),  # a write / a delete cut short
                        ("step_12", True), ("best", True)):
        (folder / name).mkdir(parents=True)
        if state:
            torch.save({"step": 0}, folder / name / "state.pt")
    (folder / "step_000004").write_text("a file, not a folder")
    assert _steps(tmp_path) == [2, 10, 1000000]  # numeric, not lexical: 1000000 after 10
    assert ckpt.resolve_checkpoint(tmp_path) == folder / "step_1000000"  # a run folder: its newest
    assert ckpt.resolve_checkpoint(folder / "step_000002") == folder / "step_000002"  # a checkpoint: itself
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*step_000003 \(expected .*step_000003/checkpoints/"
                                                r"step_NNNNNN/state.pt\)"):
        ckpt.resolve_checkpoint(folder / "step_000003")  # incomplete, and no run folder either
    for name in ("step_000002", "step_000010", "step_1000000"):
        shutil.rmtree(folder / name)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):  # only the cut-short ones are left
        ckpt.resolve_checkpoint(tmp_path)
    assert ckpt.list_checkpoints(tmp_path / "nowhere") == []


def test_a_write_cut_short_leaves_the_earlier_checkpoints_and_the_next_save_removes_it(tmp_path, monkeypatch):
    for step in (1, 2):
        _full_save(tmp_path, step)
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        _full_save(tmp_path, 3)
    monkeypatch.setattr(torch, "save", real_save)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == [f".tmp_step_000003_{os.getpid()}", "step_000001", "step_000002"], left
    assert _steps(tmp_path) == [1, 2] and ckpt.resolve_checkpoint(tmp_path).name == "step_000002"
    assert float(_w(tmp_path / "checkpoints" / "step_000002")[0]) == 2.0  # intact
    final = _full_save(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert float(_w(final)[0]) == 3.0 and torch.load(final / "state.pt")["step"] == 3
    assert (final / "config.yaml").read_text() == "train:\n  steps: 9\n"


def test_a_cleanup_cut_short_is_never_taken_for_a_checkpoint(tmp_path, monkeypatch):
    """keep=2: saving step 3 deletes step 1, first renamed to .trash_*; a kill in the middle of that delete
    (here: an interrupt after the weights file went) leaves a half-deleted folder that still holds state.pt."""
    for step in (1, 2):
        _full_save(tmp_path, step, keep=2)
    real_rmtree = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        for weights in (p for p in os.scandir(path) if p.is_dir()):
            real_rmtree(weights.path)  # the adapters' folders went, state.pt not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _full_save(tmp_path, 3, keep=2)
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    trash = tmp_path / "checkpoints" / f".trash_step_000001_{os.getpid()}"
    assert (trash / "state.pt").is_file() and not (trash / "default").exists()
    assert _steps(tmp_path) == [2, 3] and ckpt.resolve_checkpoint(tmp_path).name == "step_000003"
    _full_save(tmp_path, 4, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    again = _full_save(tmp_path, 4, keep=2)  # a step saved twice (a resumed run): replaced, nothing left over
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    assert float(_w(again)[0]) == 4.0


@pytest.fixture(scope="module")
def lora_transformer():
    from awm_fast.config import load_config
    from awm_fast.train.task import build_task

    cfg = load_config(None, ["run.device=cpu", "digits.eval_per_digit=1"])
    return build_task(cfg, torch.device("cpu")).policy.transformer


def test_loading_a_bad_checkpoint_names_what_is_missing(tmp_path, lora_transformer):
    from awm_fast.models.lora import EMA, POLICY, adapter_params

    transformer = lora_transformer
    params = {name: adapter_params(transformer, name) for name in (POLICY, EMA)}
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in params[name].values():
                p.copy_(torch.randn(p.shape, generator=g))
    saved = {name: {k: p.detach().clone() for k, p in params[name].items()} for name in (POLICY, EMA)}
    good = ckpt.save_checkpoint(tmp_path / "run", 1, transformer, {"optimizer": {"x": 1}}, keep=3)
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in params[name].values():
                p.add_(1.0)
    state = ckpt.load_checkpoint(good, transformer)
    assert state["step"] == 1 and state["optimizer"] == {"x": 1}
    for name in (POLICY, EMA):  # both adapters back to what was saved, exactly
        for k, p in params[name].items():
            assert torch.equal(p, saved[name][k]), (name, k)

    no_ema = tmp_path / "no_ema"
    shutil.copytree(good, no_ema)
    (no_ema / EMA / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(ValueError, match=rf"checkpoint {no_ema} has no {EMA}/pytorch_lora_weights.safetensors: not a "
                                         r"LoRA checkpoint \(a train.finetune=full one"):
        ckpt.load_checkpoint(no_ema, transformer)
    full = _full_save(tmp_path / "full", 1)
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        ckpt.load_checkpoint(full, transformer)

    short = tmp_path / "short"
    shutil.copytree(good, short)
    path = short / EMA / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(path))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(path))
    with pytest.raises(ValueError, match=rf"adapter '{EMA}' lacks 1 tensors, e\.g\. "
                                         rf"{dropped.removeprefix('transformer.')}"):
        ckpt.load_checkpoint(short, transformer)


def test_a_checkpoint_is_fsynced_before_the_rename_that_publishes_it(tmp_path, monkeypatch):
    _full_save(tmp_path, 1)
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = _full_save(tmp_path, 2)
    publish = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final))
    tmp = events[publish][1]
    synced_before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    written = {str(p).replace(str(final), tmp) for p in final.rglob("*")} | {tmp}
    assert written <= synced_before, sorted(written - synced_before)  # every file and folder, state.pt included
    assert ("fsync", str(final.parent)) in events[publish + 1:]  # the rename itself
    assert {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()} >= {"state.pt", "config.yaml"}


def test_a_full_disk_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    import errno

    from awm_fast.state_file import DiskFull

    _full_save(tmp_path, 1)

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(DiskFull) as info:
        _full_save(tmp_path, 2)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith(f"No space left on device writing checkpoint step_000002 to {tmp_path / 'checkpoints'} (")
    assert "GiB free" in message and "awm-fast train --resume RUN" in message
    assert _steps(tmp_path) == [1]


def test_a_run_folder_whose_newest_checkpoint_is_unreadable_falls_back_saying_so(tmp_path, caplog):
    import logging

    from awm_fast.state_file import CheckpointError

    caplog.set_level(logging.WARNING, logger="awm_fast")
    for step in (1, 2, 3):
        _full_save(tmp_path, step)
    folder = tmp_path / "checkpoints"
    state = folder / "step_000003" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    assert ckpt.resolve_checkpoint(tmp_path) == folder / "step_000002"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"[warn] the newest checkpoint of {tmp_path} cannot be read (checkpoint state {state} "
                              f"is not a torch.save archive") and warning.endswith(
        f"falling back to the newest readable one, {folder / 'step_000002'}")
    weights = folder / "step_000002" / "ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a truncated weights file counts too
    assert ckpt.resolve_checkpoint(tmp_path) == folder / "step_000001"
    (folder / "step_000001" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"^no readable checkpoint in {tmp_path}: checkpoint state {state} is"):
        ckpt.resolve_checkpoint(tmp_path)
    assert ckpt.resolve_checkpoint(folder / "step_000003") == folder / "step_000003"  # named: loading says why


def test_a_truncated_lora_file_or_another_rank_is_one_line(tmp_path, lora_transformer):
    from awm_fast.models.lora import EMA, POLICY
    from awm_fast.state_file import CheckpointError

    good = ckpt.save_checkpoint(tmp_path / "run", 1, lora_transformer, {"optimizer": {}}, keep=3)
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    path = cut / POLICY / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=rf"^checkpoint weights {path} are unreadable \(.*\): truncated") as info:
        ckpt.load_checkpoint(cut, lora_transformer)
    assert "\n" not in str(info.value)

    wider = tmp_path / "rank_x2"  # the same adapters at twice the LoRA rank
    shutil.copytree(good, wider)
    for name in (POLICY, EMA):
        path = wider / name / "pytorch_lora_weights.safetensors"
        tensors = load_file(str(path))
        save_file({k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in tensors.items()}, str(path))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {wider} adapter '{POLICY}' does not fit this model: .* "
                                              r"\(a checkpoint of another model.lora_rank or model\)$"):
        ckpt.load_checkpoint(wider, lora_transformer)
