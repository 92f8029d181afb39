"""awm_fast's messages go through the standard `logging` module: every module logs to
`logging.getLogger(__name__)`, a child of the "awm_fast" logger.

Importing awm_fast gives that logger (once) a handler that prints each message as it is, on stdout, through
`tqdm.write` so that progress bars stay intact, at level INFO: `awm-fast train` and `train(cfg)` print the same
lines ("[digits] ...", "[eval] ...", "[warn] ...") as a print would. Records also propagate to the root logger
(pytest's caplog sees them). To silence or redirect them:

    logging.getLogger("awm_fast").setLevel(logging.WARNING)   # only warnings
    logging.getLogger("awm_fast").handlers.clear()             # then add your own handlers (or rely on the root's)
"""
from __future__ import annotations

import contextlib
import logging
import sys

from tqdm import tqdm

ROOT_LOGGER = "awm_fast"


def on_terminal() -> bool:
    """Whether tqdm's stream (stderr) is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress_bar(iterable=None, *, main: bool = True, **kwargs) -> tqdm:
    """A tqdm bar under the project's one rule: shown on the main rank and only on a terminal (elsewhere the
    training loop prints progress lines instead: train/progress.py)."""
    return tqdm(iterable, disable=not (main and on_terminal()), **kwargs)


class TqdmStdoutHandler(logging.Handler):
    """Writes each formatted record on the current sys.stdout with `tqdm.write` (above any progress bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging's own convention: report, never raise from a handler
            self.handleError(record)


def install_default_handler() -> logging.Logger:
    """Gives the "awm_fast" logger a TqdmStdoutHandler ("%(message)s", level INFO), once; returns the logger."""
    root = logging.getLogger(ROOT_LOGGER)
    if not any(isinstance(h, TqdmStdoutHandler) for h in root.handlers):
        handler = TqdmStdoutHandler(logging.INFO)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return root


@contextlib.contextmanager
def only_main(is_main: bool):
    """On a non-main rank, raises the "awm_fast" logger's level to WARNING for the block (info lines are printed
    by rank 0 only; warnings still by every rank); restores the level afterwards."""
    root = logging.getLogger(ROOT_LOGGER)
    before = root.level
    if not is_main:
        root.setLevel(max(logging.WARNING, root.getEffectiveLevel()))
    try:
        yield
    finally:
        root.setLevel(before)
