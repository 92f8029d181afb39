"""Weights & Biases logging (run.wandb=true; `pip install awm-fast[wandb]`).

The run logs the per-step metrics that metrics.jsonl holds (same keys, the trainer's step as wandb's step), the
evaluations (eval/<metric>/<raw|ema>), the end-of-run images and the resolved config. run.wandb_mode=offline
writes under <run>/wandb/ without network (`wandb sync <run>/wandb/offline-run-*` uploads it later); $WANDB_MODE
and $WANDB_DIR, when set, take precedence as wandb documents. A resumed run continues the same wandb run: its id
is kept in <run>/wandb_id.txt.
"""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from awm_fast.config import Config

logger = logging.getLogger(__name__)


class WandbRun:
    """The few calls the trainer makes, over a `wandb.init` run."""

    def __init__(self, run) -> None:
        self.run = run

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def log_images(self, images: dict[str, Path], step: int) -> None:
        import wandb

        self.run.log({name: wandb.Image(str(path)) for name, path in images.items() if Path(path).is_file()},
                     step=step)

    def close(self) -> None:
        self.run.finish()


def _mode(cfg: Config) -> str:
    return os.environ.get("WANDB_MODE") or cfg.run.wandb_mode


def has_api_key() -> bool:
    """An API key in $WANDB_API_KEY or in ~/.netrc (or $NETRC) for the wandb host, where `wandb login` puts it."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def check_wandb(cfg: Config) -> None:
    """run.wandb=true can work: the package is installed and, in online mode, an API key is there. Raises
    ValueError with one line otherwise (called before the run folder exists)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("run.wandb=true needs the package 'wandb': pip install 'awm-fast[wandb]' "
                         "(or set run.wandb=false)") from None
    if _mode(cfg) == "online" and not has_api_key():
        raise ValueError("run.wandb=true in online mode, but no wandb API key ($WANDB_API_KEY or `wandb login`); "
                         "log in, or run offline with run.wandb_mode=offline (`wandb sync` later), or run.wandb=false")


def open_wandb(cfg: Config, run_dir: Path) -> WandbRun:
    """A wandb run for this training run (resumed when <run>/wandb_id.txt exists)."""
    check_wandb(cfg)
    import wandb
    run_dir = Path(run_dir)
    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # wandb ids: [a-z0-9]
    id_file.write_text(run_id)
    r = cfg.run
    mode = _mode(cfg)
    run = wandb.init(project=r.wandb_project, name=r.wandb_name or run_dir.name, mode=mode,
                     dir=os.environ.get("WANDB_DIR") or str(run_dir), id=run_id, resume="allow", config=cfg.to_dict())
    logger.info(f"[wandb] {mode} run {run_id} (project {r.wandb_project})"
                + (f", files in {run.dir}" if mode != "disabled" else ""))
    return WandbRun(run)
