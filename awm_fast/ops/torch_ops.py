"""The autograd rule and output shapes shared by the fused AWM-loss ops (Triton `awm_fast::awm_loss_triton`,
native `awm_fast::awm_loss_native`), the loss dtype rule, and the SDE-step ops' shared glue. Needs torch only.

The AWM ops return (loss, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs): the first six as
`awm_loss_torch`, except that the loss is a scalar in the inputs' precision (`loss_dtype`: float64 for float64
v, float32 otherwise; the rule of every fused backend: Triton, cpp, cuda), grad_v = dLoss/dv computed in the
forward, and the per-row gradient coefficients coefs = (c_u, c_ref, c_ema) of shape (3, R) with

    dLoss/dv       = c_u (v - u) + c_ref (v - v_ref) + c_ema (v - v_ema)
    dLoss/dtarget  = -c_u (v - u),   dLoss/dv_ref = -c_ref (v - v_ref),   dLoss/dv_ema = -c_ema (v - v_ema)
    c_u   = dLoss/dl * dl/dmse * 2 / D,   c_ref = beta w(t) 2 / (R D),   c_ema = ema_beta w(t) 2 / (R D)

(see `awm_fast.kernels.awm_loss` for dl/dmse and the clip rule; tests/ops/reference_op.py computes them in
float64 closed form as the test reference). Backward scales these by grad_output; t, advantages and
old_log_prob are treated as constants (no gradient). The per-row outputs are not differentiable, as in the
eager reference where they are detached.
"""
import torch

Tensor = torch.Tensor


def loss_dtype(v: Tensor) -> torch.dtype:
    """The dtype of the fused ops' loss: float64 for float64 v, float32 for float32 / float16 / bfloat16 v (their
    float32 accumulation). The torch backend (`awm_loss_torch`) returns float64 for every input dtype."""
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def awm_outputs_like(v: Tensor, coef_dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Empty outputs with the ops' shapes and dtypes (the fake implementations' result)."""
    rows, f32 = v.shape[0], torch.float32
    row = lambda: v.new_empty((rows,), dtype=f32)  # noqa: E731
    return (v.new_empty((), dtype=loss_dtype(v)), row(), row(), row(), row(), v.new_empty((), dtype=f32),
            torch.empty_like(v, memory_format=torch.contiguous_format), v.new_empty((3, rows), dtype=coef_dtype))


def awm_setup_context(ctx, inputs, output) -> None:
    v, target, _, _, v_ref, v_ema = inputs[:6]
    _, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs = output
    ctx.mark_non_differentiable(log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_v, coefs, v, target, v_ref, v_ema)


def awm_backward(ctx, grad_loss, *unused):
    """dLoss/dv was written in the forward: scale it by grad_output; target / v_ref / v_ema on demand."""
    grad_v, coefs, v, target, v_ref, v_ema = ctx.saved_tensors
    grads = [None] * 15
    if grad_loss is None:
        return tuple(grads)
    if ctx.needs_input_grad[0]:
        grads[0] = grad_v * grad_loss
    rows = v.shape[0]
    view = (rows,) + (1,) * (v.dim() - 1)
    for i, other, c in ((1, target, coefs[0]), (4, v_ref, coefs[1]), (5, v_ema, coefs[2])):
        if other is not None and ctx.needs_input_grad[i]:
            dtype = torch.promote_types(torch.promote_types(v.dtype, other.dtype), torch.float32)
            diff = v.to(dtype) - other.to(dtype)
            grads[i] = (-(c.reshape(view) * grad_loss).to(dtype) * diff).to(other.dtype)
    return tuple(grads)


# ---- shared by the Triton and native SDE-step ops ----

def sde_setup_context(ctx, inputs, output) -> None:
    """setup_context of the log-prob ops (x, v, sigma, sigma_next, v_uncond, x_next, noise_level, kind, w)."""
    x, v, sigma, sigma_next, v_uncond, x_next, noise_level, kind, guidance_scale = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, v, sigma, sigma_next, v_uncond, x_next)
    ctx.options = (noise_level, kind, guidance_scale)


def call_sde_step(step_op, log_prob_op, empty, x, v, sigma, sigma_next, noise, generator, noise_level, kind,
                  v_uncond, guidance_scale, x_next, seed=None, offset=0, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """`sde_step_torch`'s arguments and returned tuple on a backend's ops: log-prob mode when x_next is given;
    otherwise noise from `generator` (as the torch path draws it) unless `noise` or an in-kernel `seed` is given,
    written into `out` (in place when contiguous) or a new buffer from `empty(shape, device, dtype)`."""
    if x_next is not None:
        log_prob, mean = log_prob_op(x, v, sigma, sigma_next, v_uncond, x_next, noise_level, kind, guidance_scale)
        return x_next, log_prob, mean
    if noise is None and seed is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    direct = out is not None and out.is_contiguous()
    buf = out if direct else empty(x.shape, x.device, x.dtype)
    log_prob, mean = step_op(x, v, sigma, sigma_next, noise, v_uncond, buf, noise_level, kind, guidance_scale,
                             0 if seed is None else seed, offset)
    if out is not None and not direct:
        out.copy_(buf)
        buf = out
    return buf, log_prob, mean
