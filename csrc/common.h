// Math shared by the CPU (cpu_kernels.cpp) and CUDA (cuda_kernels.cu) implementations of the fused ops.
// No torch headers: this compiles under g++ and nvcc alone. Formulas: awm_fast/ops/awm_loss_torch.py,
// awm_fast/ops/sde_step_torch.py, and the summaries below.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

#if defined(__CUDACC__)
#define AWM_HD __host__ __device__ __forceinline__
#else
#define AWM_HD inline
#endif

namespace awm_fast {

// ---- storage dtypes <-> float (round to nearest even, as torch's .to()) ----
AWM_HD float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
AWM_HD uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}
AWM_HD float half_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp == 0) {
    float f = ldexpf(static_cast<float>(man), -24);  // subnormal (or zero)
    return sign ? -f : f;
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}
AWM_HD uint16_t float_to_half(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  uint32_t sign = (bits >> 16) & 0x8000u, absb = bits & 0x7fffffffu;
  if (absb > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absb >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (absb < 0x38800000u) {  // subnormal half: round |f| * 2^24 to an integer, ties to even
    float a;
    memcpy(&a, &absb, 4);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(nearbyintf(a * 16777216.0f)));
  }
  uint32_t r = absb + 0xfffu + ((absb >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((r - 0x38000000u) >> 13));
}

template <class T>
AWM_HD T load_as(const void* p, DType dt, int64_t i) {
  switch (dt) {
    case DType::f32: return static_cast<T>(static_cast<const float*>(p)[i]);
    case DType::f64: return static_cast<T>(static_cast<const double*>(p)[i]);
    case DType::f16: return static_cast<T>(half_to_float(static_cast<const uint16_t*>(p)[i]));
    default: return static_cast<T>(bf16_to_float(static_cast<const uint16_t*>(p)[i]));
  }
}
template <class T>
AWM_HD void store_as(void* p, DType dt, int64_t i, T x) {
  switch (dt) {
    case DType::f32: static_cast<float*>(p)[i] = static_cast<float>(x); break;
    case DType::f64: static_cast<double*>(p)[i] = static_cast<double>(x); break;
    case DType::f16: static_cast<uint16_t*>(p)[i] = float_to_half(static_cast<float>(x)); break;
    default: static_cast<uint16_t*>(p)[i] = float_to_bf16(static_cast<float>(x)); break;
  }
}

// ---- Philox 4x32-10 + Box-Muller, bit-compatible with Triton's tl.randn(seed, offset) ----
// key (k0, k1) = (seed low 32 bits, seed high 32 bits); counter (offset, 0, 0, 0); u = int32 (c ^ sign)
// * 4.6566127342e-10 on the first two outputs, randn = sqrt(-2 log max(u1, 1e-7)) cos(2 pi u2).
AWM_HD uint32_t umulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}
// The two uniforms (u1, u2) of randn(seed, offset); split from the transform so CPU loops can vectorise it.
AWM_HD void philox_uniforms(uint64_t seed, uint32_t offset, float* u1_out, float* u2_out) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint32_t p0 = c0, p2 = c2;
    c0 = umulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = umulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t i1 = static_cast<int32_t>(c0), i2 = static_cast<int32_t>(c1);
  i1 = i1 < 0 ? ~i1 : i1;
  i2 = i2 < 0 ? ~i2 : i2;
  *u1_out = static_cast<float>(i1) * 4.6566127342e-10f;
  *u2_out = static_cast<float>(i2) * 4.6566127342e-10f;
}
AWM_HD float box_muller(float u1, float u2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}
AWM_HD float philox_randn(uint64_t seed, uint32_t offset) {
  float u1, u2;
  philox_uniforms(seed, offset, &u1, &u2);
  return box_muller(u1, u2);
}

// ---- AWM loss, per sample b (rows k * B + b, k < T): everything after the row sums, in float64 ----
// mse = S_u / D; l = l(mse, t); r = exp(mean_k l - mean_k l_old) (1 on-policy); pol = max(-A r, -A clip(r));
// kl = w(t) S_ref / D; c_u = dpol/dr r / (B T) dl/dmse 2 / D; c_ref = beta w 2 / (R D) (c_ema likewise).
// Returns pol; adds kl (kl_ema) sums to *kl_sum (*kl_ema_sum) and 1 to *clipped when |r - 1| > c.
AWM_HD double awm_finalise_sample(const AwmLossArgs& a, const double* sums, int64_t b, double* kl_sum,
                                  double* kl_ema_sum, double* clipped) {
  const int64_t R = a.rows, T = a.steps, B = R / T;
  const double inv_d = 1.0 / static_cast<double>(a.dims), eps = 1e-10, p = a.ghuber_power;
  double lp_sum = 0.0, old_sum = 0.0;
  for (int64_t k = 0; k < T; ++k) {
    const int64_t row = k * B + b;
    const double mse = sums[row] * inv_d, t = a.t[row];
    double lp;
    switch (a.weighting) {
      case 0: lp = -mse; break;
      case 1: lp = -t * mse; break;
      case 2: lp = -t * t * mse; break;
      case 3: lp = -t * (sqrt(mse + eps) - 1e-5); break;
      default: lp = -(t / p) * (pow(mse + eps, p) - pow(eps, p)); break;
    }
    lp_sum += lp;
    if (a.old_log_prob) old_sum += a.old_log_prob[row];
    a.log_prob[row] = static_cast<float>(lp);
    a.mse[row] = static_cast<float>(mse);
  }
  const double ratio = a.old_log_prob ? exp(lp_sum / T - old_sum / T) : 1.0;
  const double adv = a.advantages[b], lo = 1.0 - a.clip_range, hi = 1.0 + a.clip_range;
  const double clamped = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const double x = -adv * ratio, y = -adv * clamped, dx = -adv, dy = (ratio >= lo && ratio <= hi) ? -adv : 0.0;
  const double dpol = x > y ? dx : (x < y ? dy : 0.5 * (dx + dy));
  if (fabs(ratio - 1.0) > a.clip_range) *clipped += 1.0;
  const double d_lp = dpol * ratio / static_cast<double>(B * T);
  for (int64_t k = 0; k < T; ++k) {
    const int64_t row = k * B + b;
    const double mse = sums[row] * inv_d, t = a.t[row];
    double dl;
    switch (a.weighting) {
      case 0: dl = -1.0; break;
      case 1: dl = -t; break;
      case 2: dl = -t * t; break;
      case 3: dl = -0.5 * t / sqrt(mse + eps); break;
      default: dl = -t * pow(mse + eps, p - 1.0); break;
    }
    const double w = a.elbo ? (1.0 - (t < 0.99 ? t : 0.99)) / (0.98 * t) : 1.0;
    const double c_u = d_lp * dl * 2.0 * inv_d;
    const double kl = a.has_ref ? w * sums[R + row] * inv_d : 0.0;
    const double kl_ema = a.has_ema ? w * sums[2 * R + row] * inv_d : 0.0;
    const double c_ref = a.has_ref ? a.beta * w * 2.0 * inv_d / R : 0.0;
    const double c_ema = a.has_ema ? a.ema_beta * w * 2.0 * inv_d / R : 0.0;
    a.kl[row] = static_cast<float>(kl);
    a.kl_ema[row] = static_cast<float>(kl_ema);
    store_as<double>(a.coefs, a.coef_dtype, row, c_u);
    store_as<double>(a.coefs, a.coef_dtype, R + row, c_ref);
    store_as<double>(a.coefs, a.coef_dtype, 2 * R + row, c_ema);
    *kl_sum += kl;
    *kl_ema_sum += kl_ema;
  }
  return x > y ? x : y;
}

// ---- SDE step, per row: x' = mean + scale xi with mean = a_x x + a_v v~ (v~ the CFG-combined velocity) ----
// euler_maruyama: std = a sqrt(s / (1 - s~)), a_x = 1 + std^2 dt / (2 s), a_v = (1 + std^2 (1 - s) / (2 s)) dt,
//                 scale = std sqrt(-dt), kk = 1 / scale^2;  cps: scale = s' sin(a pi/2), k = s' |cos(a pi/2)|,
//                 a_x = 1 - s' + k, a_v = -(1 - s') s + k (1 - s), kk = 2;  ode and s' == 0: a_x = 1, a_v = dt.
// log p = -Q kk / (2 D) - log scale - log sqrt(2 pi) (EM), -Q / D (cps), 0; Q = sum (x' - mean)^2.
// d log p / d mean = kk (x' - mean) / D.
struct SdeRow {
  double a_x, a_v, scale, kk;
};
AWM_HD SdeRow sde_row(const SdeArgs& a, int64_t row) {
  const double s = a.sigma[row], sn = a.sigma_next[row], dt = sn - s;
  SdeRow c{1.0, dt, 0.0, 0.0};
  if (sn == 0.0) return c;
  if (a.kind == 0) {
    const double s_den = s == 1.0 ? sn : s;
    const double std_ = a.noise_level * sqrt(s / (1.0 - s_den));
    c.a_x = 1.0 + std_ * std_ * dt / (2.0 * s);
    c.a_v = (1.0 + std_ * std_ * (1.0 - s) / (2.0 * s)) * dt;
    c.scale = std_ * sqrt(-dt);
    const double safe = c.scale > 0.0 ? c.scale : 1.0;
    c.kk = 1.0 / (safe * safe);
  } else if (a.kind == 1) {
    c.scale = sn * a.sin_a;
    const double k = sn * a.cos_a;
    c.a_x = (1.0 - sn) + k;
    c.a_v = -(1.0 - sn) * s + k * (1.0 - s);
    c.kk = 2.0;
  }
  return c;
}
AWM_HD double sde_log_prob_from_q(const SdeArgs& a, int64_t row, double q) {
  const SdeRow c = sde_row(a, row);
  if (a.sigma_next[row] == 0.0 || a.kind == 2) return 0.0;
  const double d = static_cast<double>(a.dims);
  if (a.kind == 1) return -q / d;
  const double safe = c.scale > 0.0 ? c.scale : 1.0;
  return -q / (2.0 * safe * safe * d) - log(safe) - 0.91893853320467274178;  // log sqrt(2 pi)
}

}  // namespace awm_fast
