"""A checkpoint's `state.pt`: saved as tensors and plain containers only, read without running code, written
durably.

    saved:  Tensor, torch.Size / dtype, str, int, float, bool, None, bytes, and dict / list / tuple of them;
            `to_plain` converts numpy arrays (-> tensors) and scalars (-> Python numbers), paths (-> str),
            dataclasses (-> dicts) and enums (-> their value) on save; anything else is a TypeError naming its key
    read:   torch.load(weights_only=True): a file that needs any other type (a pickle whose __reduce__ would run
            code) is refused, like an empty, truncated or garbage file, with one CheckpointError line
    durable (as PyTorch DCP): every file and folder of a checkpoint is fsync'ed before the rename that publishes
            it, and the parent folder after it (`fsync_tree`, `fsync_dir`)
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import os
import pickle
import zipfile
from pathlib import Path, PurePath

import torch

STATE_FILE = "state.pt"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # "no space left", "disk quota exceeded"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (empty, truncated, garbage, not ours, would run code): one line."""


class DiskFull(OSError):
    """A write that ran out of space (ENOSPC / EDQUOT), reported as one line saying what to do."""

    def __str__(self) -> str:
        return str(self.args[1]) if len(self.args) > 1 else super().__str__()


def disk_full(exc: OSError, what: str, where: Path) -> DiskFull:
    """The DiskFull for `exc` (an ENOSPC / EDQUOT while writing `what` under `where`)."""
    try:
        fs = os.statvfs(where)
        free = f"{fs.f_bavail * fs.f_frsize / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(exc.errno, f"No space left on device writing {what} to {where} ({free}, {os.strerror(exc.errno)}); "
                               "free space or point run.output_dir at another disk, then resume with "
                               "`awm-fast train --resume RUN` (the checkpoints written before are intact)")


def to_plain(obj, where: str = "state"):
    """`obj` as tensors and plain containers (module docstring); TypeError naming the key of anything else."""
    if type(obj).__module__.split(".")[0] == "numpy":  # before the numbers: numpy.float64 is a float subclass
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy())
        if isinstance(obj, np.generic):
            return obj.item()
    if obj is None or type(obj) in (str, bool, int, float, bytes, torch.Size, torch.dtype) or \
            isinstance(obj, torch.Tensor):  # exact types: a subclass would be pickled as its class
        return obj
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value, where)
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint's state holds only "
                    "tensors, numbers, strings and dict/list/tuple of them (loaded with weights_only=True)")


def save_state(state: dict, path: Path) -> None:
    """torch.save of `to_plain(state)`, then fsync'ed."""
    plain = to_plain(state)
    with open(path, "wb") as f:
        torch.save(plain, f)
        f.flush()
        os.fsync(f.fileno())


def _reason(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in text:
        lines = [line for line in text.splitlines() if "GLOBAL" in line]
        return (f"it holds objects beyond tensors and plain containers ({lines[0].strip().rstrip('.')}); "
                "refused: loading it could run code")
    if "central directory" in text or isinstance(exc, (EOFError, zipfile.BadZipFile)):
        return "truncated or damaged archive"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


def load_state(path: Path, *, mmap: bool = False) -> dict:
    """The training state in `path`, read with weights_only=True onto the CPU (mmap: tensors not read, a cheap
    readability check); CheckpointError saying why and what to do when it cannot be read."""
    path = Path(path)
    hint = "resume from an earlier checkpoint (--resume RUN/checkpoints/step_NNNNNN) or start a new run"
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"checkpoint state {path} cannot be read ({exc.strerror}); {hint}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint state {path} is empty (a write cut short); {hint}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint state {path} is not a torch.save archive (truncated or garbage, "
                              f"{size} bytes); {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # noqa: BLE001 - every way a file can be bad becomes the one line below
        raise CheckpointError(f"checkpoint state {path} is unreadable ({_reason(exc)}); {hint}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"checkpoint state {path} is not an awm-fast training state (a dict with a 'step'); "
                              f"{hint}")
    return state


def fsync_dir(folder: Path) -> None:
    """fsync a folder (its entries: a rename into it, a file created in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder under it (deepest first), then `folder` itself."""
    folders = []
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        folders.append(root)
    for root in reversed(folders):
        fsync_dir(Path(root))
