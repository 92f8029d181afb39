"""The RL algorithms (`train.algorithm`), one module each behind algorithms.base.Algorithm:

    awm        Advantage Weighted Matching (awm.py)
    flow_grpo  Flow-GRPO and Flow-GRPO-Fast, config section flow_grpo (flow_grpo.py)
    nft        DiffusionNFT, config section nft (nft.py)

Adding an algorithm is one module (an Algorithm subclass) plus its entry here and, when it has keys of its
own, its config section. The table names modules so config validates train.algorithm without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from awm_fast.algorithms.base import Algorithm
    from awm_fast.config import Config

ALGORITHMS = {  # train.algorithm -> (module, class)
    "awm": ("awm_fast.algorithms.awm", "AWM"),
    "flow_grpo": ("awm_fast.algorithms.flow_grpo", "FlowGRPO"),
    "nft": ("awm_fast.algorithms.nft", "NFT"),
}
ALGORITHM_NAMES = tuple(ALGORITHMS)


def get_algorithm(cfg: Config) -> Algorithm:
    """The algorithm of cfg.train.algorithm, built from the config."""
    name = cfg.train.algorithm
    if name not in ALGORITHMS:
        raise ValueError(f"train.algorithm={name!r} is not one of {ALGORITHM_NAMES}")
    module, cls = ALGORITHMS[name]
    return getattr(importlib.import_module(module), cls)(cfg)
