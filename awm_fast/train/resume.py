"""Resuming a run as it was: its saved config, the command line's overrides on top, and which changes are allowed.

`awm-fast train --resume RUN|CKPT key=value ...` loads the config saved with the checkpoint (its `config.yaml`,
else the one inside `state.pt`, else the run folder's `config.yaml`), applies the overrides, and compares:
every changed key is reported ("train.steps 6 -> 20"); a key of `config.NON_RESUMABLE` (the model, LoRA, the
batch geometry, the algorithm, the seed, ...) raises `ResumeError`, one line naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from awm_fast.config import NON_RESUMABLE, Config, ConfigError, _merge, parse_override, set_value, validate
from awm_fast.state_file import STATE_FILE, CheckpointError, load_state
from awm_fast.train.checkpoint import resolve_checkpoint

CONFIG_FILE = "config.yaml"


class ResumeError(ConfigError):
    """A resume that cannot continue the run (a non-resumable key changed, no saved config)."""


class NothingToResume(ResumeError):
    """The run folder holds nothing to continue: no (readable) checkpoint, or the run is complete."""


@dataclass(frozen=True)
class Change:
    key: str
    old: object
    new: object

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}" if isinstance(self.old, str) or isinstance(self.new, str) \
            else f"{self.key} {self.old} -> {self.new}"


def flatten(data: dict) -> dict[str, object]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}."""
    return {f"{section}.{key}": value for section, values in data.items() for key, value in values.items()}


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically: a run killed meanwhile leaves the old file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def saved_config(ckpt: Path) -> tuple[dict, str]:
    """(the config a checkpoint was trained with, where it came from): the checkpoint's config.yaml, else the
    'config' inside its state.pt, else the run folder's config.yaml."""
    ckpt = Path(ckpt)
    run_file = ckpt.parent.parent / CONFIG_FILE
    for path in (ckpt / CONFIG_FILE, None, run_file):
        if path is None:
            state = load_state(ckpt / STATE_FILE, mmap=True)  # weights_only: nothing in it runs
            if isinstance(state.get("config"), dict):
                return state["config"], str(ckpt / "state.pt")
        elif path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise ResumeError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
            if isinstance(data, dict):
                return data, str(path)
    raise ResumeError(f"checkpoint {ckpt} has no saved config ({ckpt / CONFIG_FILE}, state.pt 'config' or "
                      f"{run_file}); resume it from Python with train(cfg, resume=...)")


def build_config(data: dict, source: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- `data` (a saved config) <- overrides, validated (as config.load_config for a file)."""
    cfg = Config()
    _merge(cfg, data, source)
    for text in overrides:
        set_value(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def config_changes(old: Config | dict, new: Config | dict) -> list[Change]:
    """Every key whose value differs, in config order."""
    a = flatten(old if isinstance(old, dict) else old.to_dict())
    b = flatten(new if isinstance(new, dict) else new.to_dict())
    return [Change(k, a.get(k), b[k]) for k in b if a.get(k) != b[k]]


def non_resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in NON_RESUMABLE)


def check_resumable(changes: list[Change]) -> None:
    """ResumeError naming the first change a resumed run cannot make."""
    for c in changes:
        if non_resumable(c.key):
            raise ResumeError(f"cannot resume with {c.key} changed ({c}): the checkpoint's weights, optimizer or "
                              f"step plan depend on it; start a new run instead")


def resume_config(resume: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, list[Change], Path]:
    """(config to continue with, its changes from the saved one, the checkpoint) for `--resume RUN|CKPT`."""
    from awm_fast.train.checkpoint import STEP_DIR, list_checkpoints

    run_folder = Path(resume).is_dir() and not (Path(resume) / STATE_FILE).is_file()  # not a checkpoint folder
    if run_folder and (Path(resume) / "config.yaml").is_file() and not list_checkpoints(Path(resume)):
        raise NothingToResume(f"nothing to resume in {resume}: the run stopped before its first checkpoint "
                              f"(run.checkpoint_every); start it again: awm-fast train --config "
                              f"{Path(resume) / 'config.yaml'}")
    try:
        ckpt = resolve_checkpoint(resume)
        data, source = saved_config(ckpt)
    except (FileNotFoundError, CheckpointError) as exc:
        raise NothingToResume(str(exc)) from None
    saved = build_config(data, source)
    cfg = build_config(data, source, overrides)
    changes = config_changes(saved, cfg)
    match = STEP_DIR.match(ckpt.name)
    if run_folder and not changes and match and int(match.group(1)) >= cfg.train.steps:  # a bare --resume RUN
        raise NothingToResume(f"the run of {ckpt} is complete (step {int(match.group(1))} of train.steps="
                              f"{cfg.train.steps}): nothing to resume; to train longer: awm-fast train --resume "
                              f"{resume} train.steps={2 * cfg.train.steps}")
    check_resumable(changes)
    return cfg, changes, ckpt
