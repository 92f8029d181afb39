"""The first ~30 s of a GPU lease: does each piece the measurements rely on work on this machine?

    python -m benchmarks.smoke [--json PATH] [--device auto|cuda|cpu]

Checks, each independent (one that fails or is skipped does not stop the others), each printed as one line
`[smoke] NAME: ok|FAIL|skipped (seconds) detail` and written to the JSON after every check (so a killed run
still leaves the ones done):
- env: torch / triton / diffusers / peft versions, the device;
- attention: the backend the fast variants would use, probed forward + backward at SD3.5-M's head size (64) and
  FLUX's (128) in bf16 (benchmarks/_attention.py), with the ones that failed and fell back;
- compiled_block (last: the slowest): one transformer block of SD3.5-M width with the routed LoRA (both adapters, a mixed routing
  mask), `torch.compile(fullgraph=True)` as the fast variants compile it, forward + backward against eager;
- lora_grads: one training micro-batch of the fast path (shared batch, awm_loss with the fused backend) on a
  one-block SD3.5-M-width model: every LoRA gradient finite and not all zero;
- cuda_graph_rollout (CUDA only): one rollout step (the routed no-grad transformer call and the SDE step)
  captured as one CUDA graph by `torch.cuda.graph` (on its side stream) and replayed, the capture under
  `torch.cuda.set_sync_debug_mode("error")`, so any host sync or host-to-device copy inside the step raises
  (warm-up and the synchronize before capture run outside it).
On a CPU the checks run at tiny widths with torch.compile's aot_eager backend (`--compile-backend inductor`:
inductor's CPU code generation, as device.sh's dry run); CUDA-only checks say "skipped".
Exit status 0 whatever the checks say (device.sh goes on to the measurements either way).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SD35M_WIDTH = dict(attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048)
TINY_WIDTH = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                  pooled_projection_dim=40)


class Skipped(Exception):
    """A check that cannot run on this machine (e.g. CUDA-only on a CPU)."""


@dataclass
class Check:
    name: str
    status: str  # "ok" | "fail" | "skipped"
    seconds: float
    detail: dict = field(default_factory=dict)


@dataclass
class Setting:
    """Where the checks run: the device, the model width, the dtype, the rows and the compile backend."""

    device: torch.device
    width: dict
    dtype: torch.dtype
    latent: tuple[int, int, int]
    text_len: int
    rows: int
    compile_backend: str

    @staticmethod
    def for_device(device: torch.device, compile_backend: str | None = None) -> "Setting":
        """SD3.5-M width at 512 px (1024 image + 205 text tokens), 3 rows, inductor on CUDA; tiny widths and
        aot_eager on a CPU (`compile_backend="inductor"`: inductor's C++ code generation, as the dry run)."""
        if device.type == "cuda":
            return Setting(device, SD35M_WIDTH, torch.bfloat16, (16, 64, 64), 205, 3, compile_backend or "inductor")
        return Setting(device, TINY_WIDTH, torch.float32, (16, 8, 8), 6, 2, compile_backend or "aot_eager")


def tiny_policy(s: Setting, *, rank: int = 4):
    """A one-block SD3 transformer of the setting's width with "default" + "ema" LoRA (routed), distinct non-zero
    adapters, wrapped as the trainer's FlowPolicy in the setting's dtype."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    from awm_fast.config import ModelConfig
    from awm_fast.models.lora import EMA, POLICY, adapter_params, add_adapters
    from awm_fast.models.policy import FlowPolicy

    torch.manual_seed(0)
    with torch.device(s.device):
        model = SD3Transformer2DModel(sample_size=s.latent[1], patch_size=2, in_channels=s.latent[0],
                                      out_channels=s.latent[0], num_layers=1, pos_embed_max_size=2 * s.latent[1],
                                      qk_norm="rms_norm", **s.width)
    diffusers_logging.set_verbosity_error()  # .to() warns of modules "kept in float32" (there are none)
    model = model.to(s.dtype).requires_grad_(False)
    add_adapters(model, rank=rank, alpha=2 * rank, init="gaussian", targets=list(ModelConfig().lora_targets))
    gen = torch.Generator(device=s.device).manual_seed(1)
    with torch.no_grad():
        for name in (POLICY, EMA):
            for p in adapter_params(model, name).values():
                p.data = p.data.float()
                p.add_(0.02 * torch.randn(p.shape, generator=gen, device=s.device))
    return FlowPolicy(model, None, None, s.latent, s.device, s.dtype)


def rows(s: Setting, n: int | None = None):
    from awm_fast.models.policy import Conditioning

    n = s.rows if n is None else n
    gen = torch.Generator(device=s.device).manual_seed(2)
    rnd = lambda *shape: torch.randn(shape, generator=gen, device=s.device)  # noqa: E731
    cond = Conditioning(rnd(n, s.text_len, s.width["joint_attention_dim"]), rnd(n, s.width["pooled_projection_dim"]))
    return rnd(n, *s.latent), torch.rand(n, generator=gen, device=s.device) * 0.9 + 0.05, cond


def _finite_nonzero(named: dict) -> dict:
    bad = [k for k, g in named.items() if g is None or not torch.isfinite(g).all()]
    zero = [k for k, g in named.items() if g is not None and not bool(g.abs().sum() > 0)]
    if bad or len(zero) == len(named):
        raise ValueError(f"LoRA gradients: {len(bad)} missing or non-finite (first: {bad[:3]}), "
                         f"{len(zero)} of {len(named)} all zero")
    return {"lora_tensors": len(named), "all_zero": len(zero)}


# --- the checks ------------------------------------------------------------------------------------------------
def check_env(s: Setting) -> dict:
    import diffusers
    import peft

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "device": str(s.device), "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if s.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(s.device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(s.device)))
    return info


def check_attention(s: Setting) -> dict:
    from benchmarks._attention import working_attention_backend

    dtype = torch.bfloat16 if s.device.type == "cuda" else torch.float32
    out = {}
    for model, heads, head_dim, flux in (("sd3", 24, 64, False), ("flux", 24, 128, True)):
        if s.device.type != "cuda":
            heads = 2
        choice = working_attention_backend(s.device, dtype, heads, head_dim, 256, flux=flux, log=lambda *_: None)
        out[model] = asdict(choice)
    return out


def check_compiled_block(s: Setting) -> dict:
    from awm_fast.models.compile import compile_blocks
    from awm_fast.models.lora import POLICY, adapter_params
    from awm_fast.models.routing import routing_mask

    policy = tiny_policy(s)
    x, t, cond = rows(s)
    mask = routing_mask([(POLICY, s.rows - 1), ("ema", 1)], s.device)
    params = adapter_params(policy.transformer, POLICY)

    def run():
        for p in params.values():
            p.grad = None
        v = policy.routed_velocity(x, t, cond, mask)
        v.float().square().mean().backward()
        return v.detach().float(), {k: p.grad.clone() for k, p in params.items()}

    eager_v, eager_g = run()
    compile_blocks(policy.transformer, backend=s.compile_backend)
    start = time.perf_counter()
    comp_v, comp_g = run()
    compile_s = time.perf_counter() - start
    err = float((comp_v - eager_v).norm() / eager_v.norm())
    grad_err = max(float((comp_g[k] - g).norm() / g.norm().clamp_min(1e-30)) for k, g in eager_g.items())
    limit = 5e-2 if s.dtype != torch.float32 else 1e-4
    if not (err <= limit and grad_err <= 10 * limit):
        raise ValueError(f"compiled block differs from eager: output rel. error {err:.2e}, worst LoRA gradient "
                         f"rel. error {grad_err:.2e} (limits {limit:g}, {10 * limit:g})")
    return {"backend": s.compile_backend, "first_call_s": round(compile_s, 2), "out_rel_err": err,
            "grad_rel_err": grad_err, **_finite_nonzero(comp_g)}


def check_lora_grads(s: Setting) -> dict:
    from awm_fast.models.lora import POLICY, adapter_params
    from awm_fast.models.shared_batch import shared_velocities
    from awm_fast.ops import awm_loss

    policy = tiny_policy(s)
    x, t, cond = rows(s)
    target = torch.randn_like(x)
    v, v_ref, v_ema = shared_velocities(policy, x, t, cond, True, True)
    adv = torch.linspace(-1, 1, s.rows, device=s.device)
    out = awm_loss(v, target, t, adv, v_ref=v_ref, v_ema=v_ema, beta=1e-3, ema_beta=1.0, num_timesteps=1)
    out.loss.backward()
    if not torch.isfinite(out.loss.detach()):
        raise ValueError(f"loss {float(out.loss.detach())} is not finite")
    params = adapter_params(policy.transformer, POLICY)
    return {"loss": float(out.loss.detach()), "loss_dtype": str(out.loss.dtype).removeprefix("torch."),
            **_finite_nonzero({k: p.grad for k, p in params.items()})}


def check_cuda_graph_rollout(s: Setting) -> dict:
    if s.device.type != "cuda":
        raise Skipped("needs a CUDA device")
    from awm_fast.models.lora import POLICY
    from awm_fast.models.routing import routing_mask
    from awm_fast.ops import sde_step

    policy = tiny_policy(s)
    x, _, cond = rows(s, 6)  # the rollout batch
    mask = routing_mask([(POLICY, x.shape[0])], s.device)
    sigma, sigma_next = torch.full((x.shape[0],), 0.8, device=s.device), torch.full((x.shape[0],), 0.7, device=s.device)
    embeds, pooled = cond.embeds.to(s.dtype), cond.pooled.to(s.dtype)

    def step():  # one rollout step: the no-grad transformer call (as VelocityGraphs replays it), then the SDE step
        v = policy.forward(x.to(s.dtype), sigma, embeds, pooled, mask).float()
        return sde_step(x, v, sigma, sigma_next, noise_level=0.7).x_next

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture (autotuning, allocator)
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    out = capture_and_replay(step)
    torch.cuda.synchronize()
    if not torch.isfinite(out).all():
        raise ValueError("the replayed rollout step produced non-finite latents")
    return {"rows": int(out.shape[0]), "replayed": True}


def capture_and_replay(step: Callable[[], torch.Tensor]) -> torch.Tensor:
    """step() captured as one CUDA graph by `torch.cuda.graph` (which captures on its own side stream: torch refuses
    a capture on the default stream) under `set_sync_debug_mode("error")`, so any host sync inside the step
    raises, then replayed once; returns the graph's output. A step that fails inside the capture raises its own
    error, not capture_end's complaint about the broken capture."""
    graph = torch.cuda.CUDAGraph()
    error = None
    try:
        with torch.no_grad(), torch.cuda.graph(graph):
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = step()
            except Exception as exc:  # noqa: BLE001  re-raised below, after the capture is closed
                error = exc
            finally:
                torch.cuda.set_sync_debug_mode(0)
    except Exception:
        if error is None:
            raise
    if error is not None:
        raise error
    graph.replay()
    return out


CHECKS: dict[str, Callable[[Setting], dict]] = {
    "env": check_env, "attention": check_attention, "lora_grads": check_lora_grads,
    "cuda_graph_rollout": check_cuda_graph_rollout, "compiled_block": check_compiled_block}  # the slowest last


def run_check(name: str, fn: Callable[[Setting], dict], s: Setting) -> Check:
    start = time.perf_counter()
    try:
        detail, status = fn(s), "ok"
    except Skipped as exc:
        detail, status = {"reason": str(exc)}, "skipped"
    except Exception as exc:  # every failure is a result: the next check runs
        detail = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                  "traceback": traceback.format_exc(limit=8)[-3000:]}
        status = "fail"
    finally:
        torch._dynamo.reset()
    return Check(name, status, round(time.perf_counter() - start, 2), detail)


def summary_line(c: Check) -> str:
    brief = c.detail.get("error") or c.detail.get("reason") or ", ".join(
        f"{k}={v}" for k, v in c.detail.items() if not isinstance(v, dict))
    if c.name == "attention" and c.status == "ok":
        brief = ", ".join(f"{m}: {d['backend']}" + (f" (failed: {', '.join(d['rejected'])})" if d["rejected"] else "")
                          for m, d in c.detail.items())
    return f"[smoke] {c.name}: {'FAIL' if c.status == 'fail' else c.status} ({c.seconds:.1f} s) {brief}"[:400]


def main(argv: list[str] | None = None) -> list[Check]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="write the results here (after every check)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--only", default=None, help=f"comma list among {', '.join(CHECKS)}")
    ap.add_argument("--compile-backend", default=None, choices=("inductor", "aot_eager"),
                    help="torch.compile backend of compiled_block (default: inductor on CUDA, aot_eager on a CPU)")
    args = ap.parse_args(argv)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    setting = Setting.for_device(torch.device(name), args.compile_backend)
    wanted = list(CHECKS) if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CHECKS]
    if unknown:
        ap.error(f"--only: {unknown} not among {', '.join(CHECKS)}")
    results: list[Check] = []
    for check in wanted:
        results.append(run_check(check, CHECKS[check], setting))
        print(summary_line(results[-1]), flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"device": name, "checks": [asdict(c) for c in results]}, indent=1))
    failed = [c.name for c in results if c.status == "fail"]
    print(f"[smoke] {len(results) - len(failed)} of {len(results)} checks not failed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return results


if __name__ == "__main__":
    main()
