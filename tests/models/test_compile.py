"""Regional compile: compiled blocks equal eager ones, and nothing recompiles after the first step."""
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel

from awm_fast.config import load_config
from awm_fast.models.compile import compile_blocks, uncompile_blocks
from awm_fast.models.lora import EMA, POLICY, adapter_params, add_adapters
from awm_fast.models.policy import Conditioning, FlowPolicy
from awm_fast.models.routing import enable_checkpointing
from awm_fast.families.digits import tiny_transformer_config
from awm_fast.train.trainer import train
from tests.models.shared_batch_check import compiled_check_outputs
from tests.tolerances import tol

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def _policy(num_layers: int = 2) -> FlowPolicy:
    """Two blocks: one of each kind SD3 has (the last is context_pre_only: no context output)."""
    torch.manual_seed(0)
    m = SD3Transformer2DModel(**{**tiny_transformer_config(), "num_layers": num_layers}).requires_grad_(False)
    add_adapters(m, rank=4, alpha=8, init="gaussian", targets=TARGETS)
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in adapter_params(m, name).values():
                p.add_(0.05 * torch.randn_like(p))
    return FlowPolicy(m, None, None, (1, 8, 8), torch.device("cpu"))


@pytest.fixture
def policy():
    return _policy()


def _rows(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=gen), torch.rand(n, generator=gen),
            Conditioning(torch.randn(n, 2, 32, generator=gen), torch.randn(n, 32, generator=gen)))


@pytest.mark.slow
def test_compiled_blocks_equal_eager_and_do_not_recompile(policy):
    """With activation checkpointing, whose recompute passes the block inputs by position."""
    enable_checkpointing(policy.transformer)
    eager = compiled_check_outputs(policy, *_rows(3, 1))
    assert compile_blocks(policy.transformer, backend="aot_eager") == len(policy.transformer.transformer_blocks)
    compiled = compiled_check_outputs(policy, *_rows(3, 1))  # the warm-up: every variant compiles here
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tol(torch.float32))
    with torch.compiler.set_stance("fail_on_recompile"):
        for n, seed in ((5, 2), (2, 3)):  # other batch sizes, timesteps, inputs
            compiled_check_outputs(policy, *_rows(n, seed))
        with torch.no_grad():
            policy.velocity(*_rows(4, 4), adapter=EMA)
            policy.velocity(*_rows(7, 5), adapter=None)
    uncompile_blocks(policy.transformer)
    assert all("forward" not in b.__dict__ for b in policy.transformer.transformer_blocks)


def test_inductor_compiled_block_equals_eager():
    """Code generation (inductor) of a routed-LoRA block with our attention processor, no-grad variant
    (one block: inductor's C++ compile on CPU is the slow part of this test)."""
    policy, (x, t, cond) = _policy(num_layers=1), _rows(3, 6)
    with torch.no_grad():
        eager = [policy.velocity(x, t, cond, adapter=a) for a in (POLICY, None, EMA)]
        compile_blocks(policy.transformer, backend="inductor")
        compiled = [policy.velocity(x, t, cond, adapter=a) for a in (POLICY, None, EMA)]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_bad_compile_mode_is_a_clear_error(policy):
    with pytest.raises(ValueError, match="compile mode='fast'"):
        compile_blocks(policy.transformer, mode="fast")
    with pytest.raises(ValueError, match="no blocks to compile"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_trainer_steps_rollout_and_eval_never_recompile(tmp_path):
    """A first run compiles every variant; a second run of the same config (fresh model, new timesteps and
    noise, rollout, shared-batch training, evaluation) must not compile anything. Recompiles are decided by
    dynamo's guards, the same for every backend, so the cheapest backend ("eager") is used."""
    def cfg(name, steps, seed):
        return load_config(None, [f"run.output_dir={tmp_path}", f"run.name={name}", "run.tensorboard=false",
                                  "run.device=cpu", "run.eval_every=0", "digits.eval_per_digit=2", f"train.steps={steps}",
                                  f"train.seed={seed}", "run.checkpoint_every=0", "sample.prompts_per_step=2",
                                  "sample.group_size=4", "sample.batch_size=4", "train.micro_batch=2",
                                  "model.compile=true", "model.compile_backend=eager", "train.eval_ema=false"])

    train(cfg("warm", 1, 0))
    with torch.compiler.set_stance("fail_on_recompile"):
        summary = json.loads(train(cfg("steady", 2, 1)).read_text())
    assert summary["steps"] == 2


def _failing_backend(gm, example_inputs):
    raise RuntimeError("inductor exploded (forced for the test)")


def _backward_failing_backend():
    """Compiles the forward graph as is and fails on the backward graph, as a codegen error in it would."""
    from torch._dynamo.backends.common import aot_autograd

    def backward_compiler(gm, example_inputs):
        raise RuntimeError("backward codegen exploded (forced for the test)")

    return aot_autograd(fw_compiler=lambda gm, example_inputs: gm.forward, bw_compiler=backward_compiler)


def _compile_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[compile]")]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_a_compile_error_falls_back_to_eager_with_one_line(policy, caplog, grad):
    x, t, cond = _rows(3, 7)
    with torch.set_grad_enabled(grad):
        eager = policy.velocity(x, t, cond)
        compile_blocks(policy.transformer, backend=_failing_backend)
        first, second = policy.velocity(x, t, cond), policy.velocity(x, t, cond)
    for out in (first, second):
        torch.testing.assert_close(out, eager, **tol(torch.float32))
    lines = _compile_warnings(caplog)
    assert len(lines) == 1 and "JointTransformerBlock failed to compile" in lines[0], lines
    assert "inductor exploded" in lines[0] and "run eager" in lines[0] and "\n" not in lines[0]
    if grad:
        first.square().sum().backward()  # the eager fallback trains the LoRA as usual
        assert any(p.grad is not None for n, p in policy.transformer.named_parameters() if "lora_A.default" in n)


def test_a_recompile_storm_falls_back_to_eager_with_one_line(policy, caplog):
    """Each grad mode is a compiled variant: with the recompile limit at 1 the second one is a storm."""
    torch._dynamo.reset()
    x, t, cond = _rows(3, 8)
    with torch.no_grad():
        eager = policy.velocity(x, t, cond)
    compile_blocks(policy.transformer, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        with torch.no_grad():
            policy.velocity(x, t, cond)  # the no-grad variant compiles
        stormed = policy.velocity(x, t, cond)  # the grad variant would be a recompile past the limit
    torch.testing.assert_close(stormed.detach(), eager, **tol(torch.float32))
    lines = _compile_warnings(caplog)
    assert len(lines) == 1 and "recompile limit" in lines[0], lines
    torch._dynamo.reset()


def test_a_backward_compile_error_falls_back_in_the_forward(policy, caplog):
    """The backward graph is compiled with the forward, so its failure is caught where the block can go eager."""
    torch._dynamo.reset()
    x, t, cond = _rows(3, 9)
    eager = policy.velocity(x, t, cond)
    compile_blocks(policy.transformer, backend=_backward_failing_backend())
    out = policy.velocity(x, t, cond)
    out.square().sum().backward()  # runs: the blocks went eager in the forward
    torch.testing.assert_close(out, eager, **tol(torch.float32))
    lines = _compile_warnings(caplog)
    assert len(lines) == 1 and "backward codegen exploded" in lines[0], lines
    torch._dynamo.reset()
