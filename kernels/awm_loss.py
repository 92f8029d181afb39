"""Fused AWM loss in Triton: values and dLoss/dv in one forward (the Liger-Kernel final-loss pattern).

Three launches, no latent-sized intermediates besides grad_v, fp32 accumulation whatever the input dtypes:

1. `awm_partial_sums_kernel`, grid (R, n_chunks): per (row, chunk) partial sums of
       S_u = sum (v - u)^2,  S_ref = sum (v - v_ref)^2,  S_ema = sum (v - v_ema)^2
   into an fp32 buffer of shape (3, R, n_chunks). Splitting rows into chunks keeps every SM busy even for
   18 rows of 65,536 values.
2. `awm_finalise_kernel`, grid (1,): per row, with D values per row and R = T * B rows (timestep-major),
       mse = S_u / D,  l = l(mse, t) by weighting,  r = exp(mean_T l - mean_T l_old) (r == 1 on-policy),
       pol = max(-A r, -A clip(r, 1 - c, 1 + c)),  kl = w(t) S_ref / D,  kl_ema = w(t) S_ema / D,
       loss = mean_b pol + beta mean_i kl + ema_beta mean_i kl_ema,
   and the per-row gradient coefficients (exp_first is T = 1, B = R)
       c_u   = (1 / (B T)) dpol/dr * r * dl/dmse * 2 / D
       c_ref = beta w(t) 2 / (R D),  c_ema = ema_beta w(t) 2 / (R D).
   dpol/dr follows torch.maximum / torch.clamp autograd: -A where the unclipped branch wins, -A [lo <= r <= hi]
   where the clipped one wins, the average of both on a tie (on-policy r == 1 gives -A).
   dl/dmse: uniform -1; t -t; t2 -t^2; huber -t / (2 sqrt(mse + 1e-10)); ghuber -t (mse + 1e-10)^(p - 1).
3. `awm_grad_kernel`, grid (R, n_chunks): grad_v = c_u (v - u) + c_ref (v - v_ref) + c_ema (v - v_ema),
   stored in grad_v's dtype. Backward then only scales grad_v by grad_output.
"""
import torch
import triton
import triton.language as tl

WEIGHTING_IDS = {"uniform": 0, "t": 1, "t2": 2, "huber": 3, "ghuber": 4}
MSE_EPS = 1e-10


@triton.jit
def awm_partial_sums_kernel(v_ptr, u_ptr, ref_ptr, ema_ptr, part_ptr, stride_v, stride_u, stride_ref, stride_ema,
                            R, D, CHUNK, N_CHUNKS, HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr,
                            BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ema = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        m = cols < D
        v = tl.load(v_ptr + row64 * stride_v + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row64 * stride_u + cols, mask=m, other=0.0).to(tl.float32)
        acc_u += (v - u) * (v - u)
        if HAS_REF:
            vr = tl.load(ref_ptr + row64 * stride_ref + cols, mask=m, other=0.0).to(tl.float32)
            acc_ref += (v - vr) * (v - vr)
        if HAS_EMA:
            ve = tl.load(ema_ptr + row64 * stride_ema + cols, mask=m, other=0.0).to(tl.float32)
            acc_ema += (v - ve) * (v - ve)
    idx = row * N_CHUNKS + chunk
    tl.store(part_ptr + idx, tl.sum(acc_u, axis=0))
    if HAS_REF:
        tl.store(part_ptr + R * N_CHUNKS + idx, tl.sum(acc_ref, axis=0))
    if HAS_EMA:
        tl.store(part_ptr + 2 * R * N_CHUNKS + idx, tl.sum(acc_ema, axis=0))


@triton.jit
def _row_sum(part_ptr, rows, m, N_CHUNKS):
    acc = tl.zeros(rows.shape, dtype=tl.float32)
    for c in range(0, N_CHUNKS):
        acc += tl.load(part_ptr + rows * N_CHUNKS + c, mask=m, other=0.0)
    return acc


@triton.jit
def awm_finalise_kernel(part_ptr, t_ptr, adv_ptr, old_ptr, loss_ptr, clipfrac_ptr, lp_ptr, mse_ptr, kl_ptr,
                        kl_ema_ptr, coef_ptr, R, B, T, N_CHUNKS, inv_d, beta, ema_beta, ghuber_power, ghuber_shift,
                        clip_lo, clip_hi, clip_range, WEIGHTING: tl.constexpr, ELBO: tl.constexpr,
                        HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr, HAS_OLD: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr):
    k = tl.arange(0, BLOCK_T)[:, None]
    loss_vec = tl.zeros([BLOCK_B], dtype=tl.float32)
    clip_vec = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bm = b < B
        m = (k < T) & bm[None, :]
        rows = k * B + b[None, :]
        mse = _row_sum(part_ptr, rows, m, N_CHUNKS) * inv_d
        t = tl.load(t_ptr + rows, mask=m, other=0.5).to(tl.float32)
        if WEIGHTING == 0:
            lp = -mse
            dl = tl.full(mse.shape, -1.0, tl.float32)
        elif WEIGHTING == 1:
            lp = -t * mse
            dl = -t
        elif WEIGHTING == 2:
            lp = -t * t * mse
            dl = -t * t
        elif WEIGHTING == 3:
            root = tl.sqrt(mse + 1e-10)
            lp = -t * (root - 1e-5)
            dl = -0.5 * t / root
        else:
            powered = tl.exp(ghuber_power * tl.log(mse + 1e-10))
            lp = -(t / ghuber_power) * (powered - ghuber_shift)
            dl = -t * powered / (mse + 1e-10)
        lp_mean = tl.sum(tl.where(m, lp, 0.0), axis=0) / T
        if HAS_OLD:
            old = tl.load(old_ptr + rows, mask=m, other=0.0).to(tl.float32)
            ratio = tl.exp(lp_mean - tl.sum(tl.where(m, old, 0.0), axis=0) / T)
        else:
            ratio = tl.full([BLOCK_B], 1.0, tl.float32)
        adv = tl.load(adv_ptr + b, mask=bm, other=0.0).to(tl.float32)
        clipped = tl.minimum(tl.maximum(ratio, clip_lo), clip_hi)
        a = -adv * ratio
        c = -adv * clipped
        da = -adv
        dc = tl.where((ratio >= clip_lo) & (ratio <= clip_hi), -adv, 0.0)
        dpol = tl.where(a > c, da, tl.where(a < c, dc, 0.5 * (da + dc)))
        loss_vec += tl.where(bm, tl.maximum(a, c), 0.0) / B
        clip_vec += tl.where(bm & (tl.abs(ratio - 1.0) > clip_range), 1.0, 0.0) / B
        d_lp = (dpol * ratio / (B * T))[None, :]
        tl.store(lp_ptr + rows, lp, mask=m)
        tl.store(mse_ptr + rows, mse, mask=m)
        tl.store(coef_ptr + rows, d_lp * dl * 2.0 * inv_d, mask=m)
        if ELBO:
            w = (1.0 - tl.minimum(t, 0.99)) / (0.98 * t)
        else:
            w = tl.full(t.shape, 1.0, tl.float32)
        if HAS_REF:
            kl = w * _row_sum(part_ptr + R * N_CHUNKS, rows, m, N_CHUNKS) * inv_d
            loss_vec += beta * tl.sum(tl.where(m, kl, 0.0), axis=0) / R
            tl.store(coef_ptr + R + rows, beta * w * 2.0 * inv_d / R, mask=m)
        else:
            kl = tl.zeros(t.shape, dtype=tl.float32)
            tl.store(coef_ptr + R + rows, kl, mask=m)
        tl.store(kl_ptr + rows, kl, mask=m)
        if HAS_EMA:
            kl_ema = w * _row_sum(part_ptr + 2 * R * N_CHUNKS, rows, m, N_CHUNKS) * inv_d
            loss_vec += ema_beta * tl.sum(tl.where(m, kl_ema, 0.0), axis=0) / R
            tl.store(coef_ptr + 2 * R + rows, ema_beta * w * 2.0 * inv_d / R, mask=m)
        else:
            kl_ema = tl.zeros(t.shape, dtype=tl.float32)
            tl.store(coef_ptr + 2 * R + rows, kl_ema, mask=m)
        tl.store(kl_ema_ptr + rows, kl_ema, mask=m)
    tl.store(loss_ptr, tl.sum(loss_vec, axis=0))
    tl.store(clipfrac_ptr, tl.sum(clip_vec, axis=0))


@triton.jit
def awm_grad_kernel(v_ptr, u_ptr, ref_ptr, ema_ptr, coef_ptr, grad_ptr, stride_v, stride_u, stride_ref, stride_ema,
                    R, D, CHUNK, HAS_REF: tl.constexpr, HAS_EMA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    c_u = tl.load(coef_ptr + row)
    if HAS_REF:
        c_ref = tl.load(coef_ptr + R + row)
    if HAS_EMA:
        c_ema = tl.load(coef_ptr + 2 * R + row)
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        m = cols < D
        v = tl.load(v_ptr + row64 * stride_v + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row64 * stride_u + cols, mask=m, other=0.0).to(tl.float32)
        g = c_u * (v - u)
        if HAS_REF:
            g += c_ref * (v - tl.load(ref_ptr + row64 * stride_ref + cols, mask=m, other=0.0).to(tl.float32))
        if HAS_EMA:
            g += c_ema * (v - tl.load(ema_ptr + row64 * stride_ema + cols, mask=m, other=0.0).to(tl.float32))
        tl.store(grad_ptr + row64 * D + cols, g.to(grad_ptr.dtype.element_ty), mask=m)


TARGET_PROGRAMS = 1024  # programs per launch that the row chunking aims for (enough to fill 132 SMs)
MAX_BLOCK = 1024  # elements per tile


def empty(shape, device, dtype) -> torch.Tensor:
    """Every output and scratch buffer of the launchers comes from here (tests poison it with NaN)."""
    return torch.empty(shape, device=device, dtype=dtype)


def rows_view(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, D) view with unit inner stride (a row-strided view is kept; anything else is copied once)."""
    x2 = x.reshape(rows, -1)
    return x2 if x2.stride(1) == 1 or x2.shape[1] == 1 else x2.contiguous()


def chunking(rows: int, d: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, n_chunks): split each row so that about TARGET_PROGRAMS programs run in total."""
    target_programs, max_block = TARGET_PROGRAMS, MAX_BLOCK
    block = min(max_block, triton.next_power_of_2(max(d, 16)))
    per_program = triton.cdiv(rows * d, target_programs)
    chunk = max(block, triton.cdiv(per_program, block) * block)
    chunk = max(chunk, triton.cdiv(d, 4096 * block) * block)  # at most 4096 chunks per row
    return block, chunk, triton.cdiv(d, chunk)


def launch_awm_loss(v, target, t, advantages, v_ref, v_ema, old_log_prob, beta, ema_beta, weighting,
                    ghuber_power, clip_range, kl_weighting, ratio_mode, num_timesteps):
    """Runs the three kernels; returns (loss, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs)."""
    wrap = torch.library.wrap_triton
    rows = v.shape[0]
    d = v.numel() // rows
    has_ref, has_ema = v_ref is not None, v_ema is not None
    vv, uu = rows_view(v, rows), rows_view(target, rows)
    rr = rows_view(v_ref, rows) if has_ref else vv
    ee = rows_view(v_ema, rows) if has_ema else vv
    block, chunk, n_chunks = chunking(rows, d)
    f32 = torch.float32
    part = empty((3, rows, n_chunks), v.device, f32)
    strides = (vv.stride(0), uu.stride(0), rr.stride(0), ee.stride(0))
    wrap(awm_partial_sums_kernel)[(rows, n_chunks)](vv, uu, rr, ee, part, *strides, rows, d, chunk, n_chunks,
                                                     HAS_REF=has_ref, HAS_EMA=has_ema, BLOCK=block)
    steps = num_timesteps if ratio_mode == "sum_first" else 1
    samples = rows // steps
    loss = empty((), v.device, torch.float64 if v.dtype == torch.float64 else f32)  # stored as float64 for f64 v
    clipfrac = empty((), v.device, f32)
    stats = [empty((rows,), v.device, f32) for _ in range(4)]  # log_prob, mse, kl, kl_ema
    coefs = empty((3, rows), v.device, f32)
    block_t = triton.next_power_of_2(steps)
    block_b = max(1, min(triton.next_power_of_2(samples), 4096 // block_t))
    t, advantages = t.contiguous(), advantages.contiguous()
    old = old_log_prob.contiguous() if old_log_prob is not None else t
    wrap(awm_finalise_kernel)[(1,)](
        part, t, advantages, old, loss, clipfrac, stats[0], stats[1], stats[2], stats[3], coefs, rows, samples,
        steps, n_chunks, 1.0 / d, beta, ema_beta, ghuber_power, MSE_EPS**ghuber_power, 1.0 - clip_range,
        1.0 + clip_range, clip_range, WEIGHTING=WEIGHTING_IDS[weighting], ELBO=kl_weighting == "elbo",
        HAS_REF=has_ref, HAS_EMA=has_ema, HAS_OLD=old_log_prob is not None, BLOCK_T=block_t, BLOCK_B=block_b)
    grad = empty(v.shape, v.device, v.dtype)
    wrap(awm_grad_kernel)[(rows, n_chunks)](vv, uu, rr, ee, coefs, grad, *strides, rows, d, chunk,
                                             HAS_REF=has_ref, HAS_EMA=has_ema, BLOCK=block)
    return loss, stats[0], stats[1], stats[2], stats[3], clipfrac, grad, coefs
