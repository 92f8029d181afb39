"""Fused rollout step in Triton (formulas in `awm_fast.ops.sde_step_torch`), fp32 arithmetic.

Every kind is affine in x and the (guided) velocity v~ = v_uncond + w (v - v_uncond), per row:

    mean = a_x x + a_v v~,   x' = mean + scale xi
    euler_maruyama: std = a sqrt(sigma / (1 - sigma~)) (sigma~ = sigma_next where sigma == 1),
                    a_x = 1 + std^2 dt / (2 sigma),  a_v = (1 + std^2 (1 - sigma) / (2 sigma)) dt,
                    scale = std sqrt(-dt)
    cps:            scale = sigma_next sin(a pi / 2),  k = sqrt(sigma_next^2 - scale^2) = sigma_next |cos(a pi / 2)|,
                    a_x = (1 - sigma_next) + k,  a_v = -(1 - sigma_next) sigma + k (1 - sigma)
    ode, and every step with sigma_next == 0: a_x = 1, a_v = dt, scale = 0, log p = 0.

log p per row from Q = sum_d (x' - mean)^2 over D values:
    euler_maruyama: -Q / (2 s^2 D) - log s - log sqrt(2 pi)   (s = scale, or 1 where scale == 0)
    cps:            -Q / D
and d log p / d mean = kk (x' - mean) with kk = 1 / (s^2 D) (euler_maruyama), 2 / D (cps), 0 otherwise.

Kernels: `sde_fwd_kernel` (grid (B, n_chunks)) writes mean, x' (sampling) and partial sums of Q;
`sde_log_prob_kernel` (grid (1,)) reduces them per row; `sde_bwd_kernel` (grid (B, n_chunks)) writes
grad_v = w a_v g, grad_v_uncond = (1 - w) a_v g, grad_x = a_x g, grad_x' = -g_lp kk (x' - mean) with
g = g_lp kk (x' - mean) + g_mean. In-kernel noise: xi_i = tl.randn(seed, offset + i), i the flat index.
"""
import math

import torch
import triton
import triton.language as tl

from awm_fast.kernels import awm_loss as common
from awm_fast.kernels.awm_loss import chunking, rows_view

KIND_IDS = {"euler_maruyama": 0, "cps": 1, "ode": 2}
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@triton.jit
def _row_coefs(sigma_ptr, sigma_next_ptr, row, noise_level, sin_a, cos_a, KIND: tl.constexpr):
    """(a_x, a_v, scale, kk_num) for one row; kk = kk_num / D is d log p / d mean per (x' - mean)."""
    s = tl.load(sigma_ptr + row).to(tl.float32)
    sn = tl.load(sigma_next_ptr + row).to(tl.float32)
    dt = sn - s
    if KIND == 0:
        s_den = tl.where(s == 1.0, sn, s)
        std = noise_level * tl.sqrt(s / (1.0 - s_den))
        a_x = 1.0 + std * std * dt / (2.0 * s)
        a_v = (1.0 + std * std * (1.0 - s) / (2.0 * s)) * dt
        scale = std * tl.sqrt(-dt)
        safe = tl.where(scale > 0.0, scale, 1.0)
        kk_num = 1.0 / (safe * safe)
    elif KIND == 1:
        scale = sn * sin_a
        k = sn * cos_a
        a_x = (1.0 - sn) + k
        a_v = -(1.0 - sn) * s + k * (1.0 - s)
        kk_num = 2.0 + 0.0 * s
    else:
        a_x = 1.0 + 0.0 * s
        a_v = dt
        scale = 0.0 * s
        kk_num = 0.0 * s
    last = sn == 0.0
    a_x = tl.where(last, 1.0, a_x)
    a_v = tl.where(last, dt, a_v)
    scale = tl.where(last, 0.0, scale)
    kk_num = tl.where(last, 0.0, kk_num)
    return a_x, a_v, scale, kk_num


@triton.jit
def _guided(v_ptr, vu_ptr, row64, stride_v, stride_vu, cols, m, guidance, HAS_UNCOND: tl.constexpr):
    v = tl.load(v_ptr + row64 * stride_v + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        vu = tl.load(vu_ptr + row64 * stride_vu + cols, mask=m, other=0.0).to(tl.float32)
        v = vu + guidance * (v - vu)
    return v


@triton.jit
def sde_fwd_kernel(x_ptr, v_ptr, vu_ptr, noise_ptr, x_next_ptr, out_ptr, mean_ptr, sigma_ptr, sigma_next_ptr,
                   part_ptr, stride_x, stride_v, stride_vu, stride_noise, stride_xn, D, CHUNK, N_CHUNKS,
                   noise_level, sin_a, cos_a, guidance, seed, offset, KIND: tl.constexpr,
                   HAS_UNCOND: tl.constexpr, NOISE: tl.constexpr, LOG_PROB_MODE: tl.constexpr,
                   BLOCK: tl.constexpr):
    """NOISE: 0 none (scale is 0 or log-prob mode), 1 noise tensor, 2 tl.randn(seed, offset + i)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    a_x, a_v, scale, kk_num = _row_coefs(sigma_ptr, sigma_next_ptr, row, noise_level, sin_a, cos_a, KIND)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(x_ptr + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        v = _guided(v_ptr, vu_ptr, row64, stride_v, stride_vu, cols, m, guidance, HAS_UNCOND)
        mean = a_x * x + a_v * v
        tl.store(mean_ptr + row64 * D + cols, mean.to(mean_ptr.dtype.element_ty), mask=m)
        if LOG_PROB_MODE:
            diff = tl.load(x_next_ptr + row64 * stride_xn + cols, mask=m, other=0.0).to(tl.float32) - mean
        else:
            if NOISE == 1:
                xi = tl.load(noise_ptr + row64 * stride_noise + cols, mask=m, other=0.0).to(tl.float32)
            elif NOISE == 2:
                xi = tl.randn(seed, (offset + row64 * D + cols).to(tl.uint32))
            else:
                xi = tl.zeros([BLOCK], dtype=tl.float32)
            diff = scale * xi
            tl.store(out_ptr + row64 * D + cols, (mean + diff).to(out_ptr.dtype.element_ty), mask=m)
        acc += tl.where(m, diff * diff, 0.0)
    tl.store(part_ptr + row * N_CHUNKS + chunk, tl.sum(acc, axis=0))


@triton.jit
def sde_log_prob_kernel(part_ptr, sigma_ptr, sigma_next_ptr, lp_ptr, B, D, N_CHUNKS, noise_level, sin_a, cos_a,
                        log_sqrt_2pi, KIND: tl.constexpr, BLOCK_B: tl.constexpr):
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        m = rows < B
        q = tl.zeros([BLOCK_B], dtype=tl.float32)
        for c in range(0, N_CHUNKS):
            q += tl.load(part_ptr + rows * N_CHUNKS + c, mask=m, other=0.0)
        s = tl.load(sigma_ptr + rows, mask=m, other=0.5).to(tl.float32)
        sn = tl.load(sigma_next_ptr + rows, mask=m, other=0.25).to(tl.float32)
        if KIND == 0:
            s_den = tl.where(s == 1.0, sn, s)
            scale = noise_level * tl.sqrt(s / (1.0 - s_den)) * tl.sqrt(s - sn)
            safe = tl.where(scale > 0.0, scale, 1.0)
            lp = -q / (2.0 * safe * safe * D) - tl.log(safe) - log_sqrt_2pi
        elif KIND == 1:
            lp = -q / D
        else:
            lp = 0.0 * q
        tl.store(lp_ptr + rows, tl.where(sn == 0.0, 0.0, lp), mask=m)


@triton.jit
def sde_bwd_kernel(x_ptr, v_ptr, vu_ptr, x_next_ptr, g_lp_ptr, g_mean_ptr, sigma_ptr, sigma_next_ptr, gv_ptr,
                   gvu_ptr, gx_ptr, gxn_ptr, stride_x, stride_v, stride_vu, stride_xn, stride_gm, D, CHUNK,
                   noise_level, sin_a, cos_a, guidance, KIND: tl.constexpr, HAS_UNCOND: tl.constexpr,
                   HAS_G_LP: tl.constexpr, HAS_G_MEAN: tl.constexpr, NEED_X: tl.constexpr,
                   NEED_XN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    a_x, a_v, scale, kk_num = _row_coefs(sigma_ptr, sigma_next_ptr, row, noise_level, sin_a, cos_a, KIND)
    if HAS_G_LP:
        g_lp = tl.load(g_lp_ptr + row).to(tl.float32) * kk_num / D
    else:
        g_lp = 0.0 * kk_num
    for off in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
        m = cols < D
        x = tl.load(x_ptr + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        v = _guided(v_ptr, vu_ptr, row64, stride_v, stride_vu, cols, m, guidance, HAS_UNCOND)
        xn = tl.load(x_next_ptr + row64 * stride_xn + cols, mask=m, other=0.0).to(tl.float32)
        d_lp = g_lp * (xn - (a_x * x + a_v * v))
        g = d_lp
        if HAS_G_MEAN:
            g += tl.load(g_mean_ptr + row64 * stride_gm + cols, mask=m, other=0.0).to(tl.float32)
        gvc = a_v * g
        if HAS_UNCOND:
            tl.store(gv_ptr + row64 * D + cols, (guidance * gvc).to(gv_ptr.dtype.element_ty), mask=m)
            tl.store(gvu_ptr + row64 * D + cols, ((1.0 - guidance) * gvc).to(gvu_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(gv_ptr + row64 * D + cols, gvc.to(gv_ptr.dtype.element_ty), mask=m)
        if NEED_X:
            tl.store(gx_ptr + row64 * D + cols, (a_x * g).to(gx_ptr.dtype.element_ty), mask=m)
        if NEED_XN:
            tl.store(gxn_ptr + row64 * D + cols, (-d_lp).to(gxn_ptr.dtype.element_ty), mask=m)


def _trig(noise_level: float) -> tuple[float, float]:
    sin_a = math.sin(noise_level * math.pi / 2)
    return sin_a, math.sqrt(max(1.0 - sin_a * sin_a, 0.0))


def launch_sde_forward(x, v, sigma, sigma_next, noise, v_uncond, x_next, out, noise_level, kind, guidance_scale,
                       seed, offset):
    """Sampling (x_next None: writes `out`, a contiguous buffer) or log-prob mode. Returns (log_prob, mean)."""
    wrap = torch.library.wrap_triton
    rows = x.shape[0]
    d = x.numel() // rows
    xx, vv = rows_view(x, rows), rows_view(v, rows)
    uu = rows_view(v_uncond, rows) if v_uncond is not None else vv
    nn = rows_view(noise, rows) if noise is not None else xx
    xn = rows_view(x_next, rows) if x_next is not None else xx
    block, chunk, n_chunks = chunking(rows, d)
    part = common.empty((rows, n_chunks), x.device, torch.float32)
    mean = common.empty(x.shape, x.device, x.dtype)
    sigma, sigma_next = sigma.contiguous(), sigma_next.contiguous()
    sin_a, cos_a = _trig(noise_level)
    noise_mode = 0 if x_next is not None or kind == "ode" else (1 if noise is not None else 2)
    wrap(sde_fwd_kernel)[(rows, n_chunks)](
        xx, vv, uu, nn, xn, out if out is not None else mean, mean, sigma, sigma_next, part, xx.stride(0),
        vv.stride(0), uu.stride(0), nn.stride(0), xn.stride(0), d, chunk, n_chunks, noise_level, sin_a, cos_a,
        guidance_scale, seed, offset, KIND=KIND_IDS[kind], HAS_UNCOND=v_uncond is not None, NOISE=noise_mode,
        LOG_PROB_MODE=x_next is not None, BLOCK=block)
    log_prob = common.empty((rows,), x.device, torch.float32)
    wrap(sde_log_prob_kernel)[(1,)](part, sigma, sigma_next, log_prob, rows, d, n_chunks, noise_level, sin_a, cos_a,
                                    LOG_SQRT_2PI, KIND=KIND_IDS[kind], BLOCK_B=min(1024, triton.next_power_of_2(rows)))
    return log_prob, mean


def launch_sde_backward(x, v, v_uncond, x_next, sigma, sigma_next, g_lp, g_mean, noise_level, kind,
                        guidance_scale, need_x, need_xn):
    """Returns (grad_v, grad_v_uncond | None, grad_x | None, grad_x_next | None)."""
    rows = x.shape[0]
    d = x.numel() // rows
    xx, vv, xn = rows_view(x, rows), rows_view(v, rows), rows_view(x_next, rows)
    uu = rows_view(v_uncond, rows) if v_uncond is not None else vv
    gm = rows_view(g_mean, rows) if g_mean is not None else xx
    block, chunk, n_chunks = chunking(rows, d)
    gv = common.empty(v.shape, v.device, v.dtype)
    gvu = common.empty(v_uncond.shape, v.device, v_uncond.dtype) if v_uncond is not None else None
    gx = common.empty(x.shape, x.device, x.dtype) if need_x else None
    gxn = common.empty(x_next.shape, x.device, x_next.dtype) if need_xn else None
    sin_a, cos_a = _trig(noise_level)
    g_lp_c = g_lp.contiguous() if g_lp is not None else sigma
    torch.library.wrap_triton(sde_bwd_kernel)[(rows, n_chunks)](
        xx, vv, uu, xn, g_lp_c, gm, sigma.contiguous(), sigma_next.contiguous(), gv,
        gvu if gvu is not None else gv, gx if need_x else gv, gxn if need_xn else gv, xx.stride(0), vv.stride(0),
        uu.stride(0), xn.stride(0), gm.stride(0), d, chunk, noise_level, sin_a, cos_a, guidance_scale,
        KIND=KIND_IDS[kind], HAS_UNCOND=v_uncond is not None, HAS_G_LP=g_lp is not None,
        HAS_G_MEAN=g_mean is not None, NEED_X=need_x, NEED_XN=need_xn, BLOCK=block)
    return gv, gvu, gx, gxn
