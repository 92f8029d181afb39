"""Regional torch.compile: every transformer block compiled on its own, before any distributed wrapping.

diffusers' `compile_repeated_blocks` raises on SD3 (it defines no `_repeated_blocks`), so each block of
`transformer_blocks` (and FLUX's `single_transformer_blocks`) gets a compiled forward here. Blocks of one
class share one compiled function: torch.compile caches per code object and, with nn.Module inlining, a
block's parameters are graph inputs, so one graph serves every block of the same structure (SD3.5-M has
three: dual-attention blocks 0-12, single-attention blocks, the last context-pre-only block).

Only the batch dimension is dynamic (marked on the block inputs before each call), so rollout batches,
training rows, the [policy; ref; ema] shared batch and evaluation batches reuse one graph per variant. The
adapters are a tensor input (models.routing), so switching between policy, reference and EMA recompiles
nothing. Variants that torch.compile must specialise remain: grad mode (rollout vs training) and whether
the block input requires grad; all are compiled in the first training step, and none after (tested with
`torch.compiler.set_stance("fail_on_recompile")`).

A compile that fails on the user's machine (a dynamo / inductor error, a missing compiler or Triton) or a
recompile storm (a block class hitting torch._dynamo's recompile limit) does not stop the run: every block of
that transformer runs its eager forward from then on, after one log line naming the block class and the reason.
(`fail_on_recompile` stances, used by the tests, still raise.) The backward graph is compiled with the forward
(AOTAutograd's non-lazy backward lowering), so its compile errors surface in the forward call too, where the
block can still run eager, not in `loss.backward()`.
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
from torch._dynamo.exc import FailOnRecompileLimitHit, RecompileError, TorchDynamoException

logger = logging.getLogger(__name__)

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks",
               "noise_refiner", "context_refiner", "layers",  # Z-Image: image / caption refiners, main layers
               "blocks")  # Wan
BATCH_INPUTS = ("hidden_states", "encoder_hidden_states", "temb",
                "encoder_hidden_states_mask",  # Qwen-Image: the prompts' token mask (B, L)
                "x", "attn_mask", "freqs_cis", "adaln_input",  # Z-Image block inputs
                "temb_mod_img", "temb_mod_txt", "temb_mod")  # FLUX.2: the shared modulation tensors (B, k d)
# inputs whose dim 1 (tokens) is dynamic too: Z-Image's sequences are padded to each batch's longest caption
SEQUENCE_INPUTS = ("x", "attn_mask", "freqs_cis")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# compiled variants per block class: grad off; grad on with the input not requiring / requiring grad;
# times two for activation checkpointing's recompute, with room to spare
VARIANTS_PER_CLASS = 8
# what a compiled block may raise that its eager forward does not: compile errors (BackendCompilerFailed, its
# InductorError, Unsupported, ...) and the recompile limit (raised under fullgraph=True)
COMPILE_ERRORS = (TorchDynamoException, FailOnRecompileLimitHit)


def _reason(exc: BaseException) -> str:
    """'Outer: Inner: first line' of an exception and the innermost error it wraps (dynamo wraps the backend's)."""
    inner = exc
    while (getattr(inner, "inner_exception", None) or inner.__cause__) is not None:
        inner = getattr(inner, "inner_exception", None) or inner.__cause__
    line = next((x for x in str(inner).strip().splitlines() if x.strip()), "")[:200]
    return f"{type(exc).__name__}: " + (f"{type(inner).__name__}: " if inner is not exc else "") + line


class _EagerFallback:
    """Shared by the blocks of one compiled transformer: set once a compiled block failed (see the docstring)."""

    def __init__(self) -> None:
        self.eager = False

    def fail(self, block, exc: BaseException) -> None:
        self.eager = True
        what = ("hit torch._dynamo's recompile limit (a recompile storm)" if isinstance(exc, FailOnRecompileLimitHit)
                else f"failed to compile ({_reason(exc)})")
        logger.warning(f"[compile] off: {type(block).__name__} {what}; the transformer's blocks run eager")


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    return [b for name in BLOCK_LISTS for b in getattr(transformer, name, None) or []]


def _batch_dynamic_call(compiled, block, fallback: _EagerFallback):
    """block.forward(...) through `compiled`, with dim 0 of the batch inputs marked dynamic whether they come
    by keyword (the transformers' loops) or by position (diffusers' gradient checkpointing); the eager forward
    once `fallback` is set, or when this call's compile fails (which sets it)."""
    positions = list(inspect.signature(type(block).forward).parameters)[1:]
    eager = type(block).forward

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        if fallback.eager:
            return eager(block, *args, **kwargs)
        named = {**dict(zip(positions, args)), **kwargs}
        for name in BATCH_INPUTS:
            if isinstance(named.get(name), torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(named[name], 0)
        for name in SEQUENCE_INPUTS:
            if isinstance(named.get(name), torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(named[name], 1)
        try:
            return compiled(block, *args, **kwargs)
        except RecompileError:
            raise  # a fail_on_recompile stance asked for it
        except COMPILE_ERRORS as exc:
            fallback.fail(block, exc)
            return eager(block, *args, **kwargs)

    return forward


def compile_blocks(transformer, *, mode: str = "default", backend: str = "inductor") -> int:
    """Compile each block's forward (fullgraph) in place; returns the number of blocks. Parameter names and
    the state dict are unchanged (the compiled forward is an instance attribute)."""
    if mode not in MODES:
        raise ValueError(f"compile mode={mode!r} is not one of {MODES}")
    blocks = transformer_blocks(transformer)
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has none of {BLOCK_LISTS}: no blocks to compile")
    compiled: dict[type, object] = {}
    fallback = _EagerFallback()
    for block in blocks:
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, fullgraph=True, backend=backend,
                                          mode=None if mode == "default" else mode)
        block.forward = _batch_dynamic_call(compiled[cls], block, fallback)
    limit = VARIANTS_PER_CLASS * 4  # up to four block structures per class (tests build several models)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._functorch.config.force_non_lazy_backward_lowering = True  # backward compile errors in the forward
    return len(blocks)


def uncompile_blocks(transformer) -> None:
    """Back to the eager forwards."""
    for block in transformer_blocks(transformer):
        block.__dict__.pop("forward", None)
