"""state.pt (awm_fast/state_file.py): what we save loads with weights_only=True, a crafted pickle runs nothing
and is refused with one line, damaged files are one line each, and fsync_tree syncs every file and folder."""
import dataclasses
import enum
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from awm_fast.state_file import CheckpointError, fsync_tree, load_state, save_state, to_plain


class Touch:
    """A pickle payload: unpickling it (anything but weights_only) creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Box:
    size: int
    where: Path


def test_what_we_save_is_plain_and_loads_with_weights_only(tmp_path, gen):
    state = {"step": 3, "optimizer": {"state": {0: {"exp_avg": torch.randn(4, generator=gen)}}, "param_groups": [
        {"lr": 1e-3, "params": [0]}]}, "rng": [{"torch": torch.get_rng_state(), "cuda": None}],
        "numpy_rng": np.random.default_rng(5).bit_generator.state, "py_rng": random.Random(5).getstate(),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float64(0.25), "path": tmp_path,
        "box": Box(2, tmp_path / "x"), "color": Color.RED, "shape": torch.Size([2, 3]), "dtype": torch.bfloat16}
    save_state(state, tmp_path / "state.pt")
    back = torch.load(tmp_path / "state.pt", weights_only=True)  # no allow-list needed
    assert load_state(tmp_path / "state.pt")["step"] == 3
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(back["rng"][0]["torch"], state["rng"][0]["torch"])
    assert torch.equal(back["array"], torch.arange(6.0).reshape(2, 3)) and back["scalar"] == 0.25
    assert back["path"] == str(tmp_path) and back["box"] == {"size": 2, "where": str(tmp_path / "x")}
    assert back["color"] == "red" and back["shape"] == (2, 3) and back["dtype"] == torch.bfloat16
    assert back["py_rng"] == random.Random(5).getstate()  # a tuple of ints: restorable as it was
    assert back["numpy_rng"]["state"] == np.random.default_rng(5).bit_generator.state["state"]
    with pytest.raises(TypeError, match=r"^state\['evals'\]\[1\] is a tests.test_state_file.Touch: a checkpoint's "
                                        r"state holds only tensors"):
        to_plain({"evals": [1, Touch(tmp_path / "m")]})


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_a_crafted_pickle_runs_nothing_and_is_refused_with_one_line(tmp_path, fmt):
    marker, path = tmp_path / "ran", tmp_path / "state.pt"
    payload = {"step": 3, "optimizer": {}, "evil": Touch(marker)}
    if fmt == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    pickle.loads(pickle.dumps(Touch(marker)))  # the payload is live: an ordinary unpickling runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as info:
        load_state(path)
    assert not marker.exists()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"checkpoint state {path} ")
    if fmt == "torch.save":
        assert "GLOBAL posix.system" in message and "refused: loading it could run code" in message
    else:
        assert "not a torch.save archive" in message


def test_damaged_files_are_one_line_each(tmp_path, gen):
    good = tmp_path / "good.pt"
    save_state({"step": 1, "w": torch.randn(1000, generator=gen)}, good)
    data = good.read_bytes()
    cases = {"empty": (b"", "is empty"), "truncated": (data[:len(data) // 2], "not a torch.save archive"),
             "tail cut": (data[:-40], "not a torch.save archive"),
             "garbage": (bytes(torch.randint(0, 256, (4000,), generator=gen).to(torch.uint8).tolist()),
                         "not a torch.save archive")}
    for name, (content, expected) in cases.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match=expected) as info:
            load_state(path)
        assert "\n" not in str(info.value) and "resume from an earlier checkpoint" in str(info.value), name
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not an awm-fast training state"):
        load_state(tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(tmp_path / "missing.pt")


def test_fsync_tree_syncs_every_file_then_the_folders_deepest_first(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for p in (tmp_path / "x", tmp_path / "a" / "y", tmp_path / "a" / "b" / "z"):
        p.write_text(p.name)
    synced, real_fsync = [], os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    fsync_tree(tmp_path)
    files = {str(tmp_path / "x"), str(tmp_path / "a" / "y"), str(tmp_path / "a" / "b" / "z")}
    assert set(synced[:3]) == files
    assert synced[3:] == [str(tmp_path / "a" / "b"), str(tmp_path / "a"), str(tmp_path)]
