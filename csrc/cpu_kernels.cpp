// CPU implementation of the fused ops (no torch headers; ops.cpp calls it).
//
// Work is split into (row, chunk) tasks of CHUNK values, run with OpenMP over the tasks (so a few long rows
// still use every thread) in a fixed order, which makes results independent of the thread count. Inside a
// task, TILE values of each input are converted to the math type (float, or double when every latent input
// is float64) and processed by `#pragma omp simd` loops; per-tile float sums are added into float64 row sums.
// The per-row finalisation (ratios, clipping, KL weights, log-probs) is in float64 (common.h).
#include <algorithm>
#include <vector>

#include "common.h"

namespace awm_fast {
namespace {

constexpr int64_t TILE = 512;
constexpr int64_t CHUNK = 1 << 15;

template <class T>
constexpr DType dtype_of() {
  return sizeof(T) == 8 ? DType::f64 : DType::f32;
}

// TILE (or fewer) values of row `row` from column c0, as T: a pointer into the input when no conversion is
// needed, else converted into buf.
template <class T>
const T* load_tile(const RowsView& r, int64_t row, int64_t c0, int64_t n, T* buf) {
  const int64_t base = row * r.stride + c0;
  if (r.dtype == dtype_of<T>()) return static_cast<const T*>(r.ptr) + base;
  switch (r.dtype) {
    case DType::f32: {
      const float* p = static_cast<const float*>(r.ptr) + base;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(p[i]);
      break;
    }
    case DType::f64: {
      const double* p = static_cast<const double*>(r.ptr) + base;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(p[i]);
      break;
    }
    case DType::f16: {
      const uint16_t* p = static_cast<const uint16_t*>(r.ptr) + base;
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(half_to_float(p[i]));
      break;
    }
    default: {
      const uint16_t* p = static_cast<const uint16_t*>(r.ptr) + base;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(bf16_to_float(p[i]));
      break;
    }
  }
  return buf;
}

// Classifier-free guidance on one tile: v_uncond + w (v - v_uncond) into vt, or v itself without guidance.
template <class T, class Args>
const T* guided_tile(const Args& a, int64_t row, int64_t c0, int64_t n, const T* v, T w, T* bu, T* vt) {
  if (!a.has_uncond) return v;
  const T* u = load_tile(a.v_uncond, row, c0, n, bu);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) vt[i] = u[i] + w * (v[i] - u[i]);
  return vt;
}

template <class T>
void store_tile(void* p, DType dt, int64_t base, int64_t n, const T* src) {
  switch (dt) {
    case DType::f32: {
      float* q = static_cast<float*>(p) + base;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<float>(src[i]);
      break;
    }
    case DType::f64: {
      double* q = static_cast<double*>(p) + base;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) q[i] = static_cast<double>(src[i]);
      break;
    }
    case DType::f16: {
      uint16_t* q = static_cast<uint16_t*>(p) + base;
      for (int64_t i = 0; i < n; ++i) q[i] = float_to_half(static_cast<float>(src[i]));
      break;
    }
    default: {
      uint16_t* q = static_cast<uint16_t*>(p) + base;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) q[i] = float_to_bf16(static_cast<float>(src[i]));
      break;
    }
  }
}

int64_t n_chunks(int64_t dims) { return (dims + CHUNK - 1) / CHUNK; }

// ---- AWM loss ----
template <class T>
void awm_row_sums(const AwmLossArgs& a, double* part) {
  const int64_t nc = n_chunks(a.dims), tasks = a.rows * nc, R = a.rows;
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t row = task / nc, c_begin = (task % nc) * CHUNK, c_end = std::min(a.dims, c_begin + CHUNK);
    T bv[TILE], bu[TILE], br[TILE], be[TILE];
    double acc_u = 0, acc_r = 0, acc_e = 0;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += TILE) {
      const int64_t n = std::min(TILE, c_end - c0);
      const T* v = load_tile(a.v, row, c0, n, bv);
      const T* u = load_tile(a.target, row, c0, n, bu);
      T su = 0, sr = 0, se = 0;
#pragma omp simd reduction(+ : su)
      for (int64_t i = 0; i < n; ++i) su += (v[i] - u[i]) * (v[i] - u[i]);
      if (a.has_ref) {
        const T* r = load_tile(a.v_ref, row, c0, n, br);
#pragma omp simd reduction(+ : sr)
        for (int64_t i = 0; i < n; ++i) sr += (v[i] - r[i]) * (v[i] - r[i]);
      }
      if (a.has_ema) {
        const T* e = load_tile(a.v_ema, row, c0, n, be);
#pragma omp simd reduction(+ : se)
        for (int64_t i = 0; i < n; ++i) se += (v[i] - e[i]) * (v[i] - e[i]);
      }
      acc_u += su;
      acc_r += sr;
      acc_e += se;
    }
    const int64_t chunk = task % nc;
    part[(0 * R + row) * nc + chunk] = acc_u;
    part[(1 * R + row) * nc + chunk] = acc_r;
    part[(2 * R + row) * nc + chunk] = acc_e;
  }
}

// grad_v = c_u (v - u) + c_ref (v - v_ref) + c_ema (v - v_ema)
template <class T>
void awm_grad(const AwmLossArgs& a) {
  const int64_t nc = n_chunks(a.dims), tasks = a.rows * nc, R = a.rows;
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t row = task / nc, c_begin = (task % nc) * CHUNK, c_end = std::min(a.dims, c_begin + CHUNK);
    const T c_u = static_cast<T>(load_as<double>(a.coefs, a.coef_dtype, row));
    const T c_r = static_cast<T>(load_as<double>(a.coefs, a.coef_dtype, R + row));
    const T c_e = static_cast<T>(load_as<double>(a.coefs, a.coef_dtype, 2 * R + row));
    T bv[TILE], bu[TILE], br[TILE], be[TILE], g[TILE];
    for (int64_t c0 = c_begin; c0 < c_end; c0 += TILE) {
      const int64_t n = std::min(TILE, c_end - c0);
      const T* v = load_tile(a.v, row, c0, n, bv);
      const T* u = load_tile(a.target, row, c0, n, bu);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) g[i] = c_u * (v[i] - u[i]);
      if (a.has_ref) {
        const T* r = load_tile(a.v_ref, row, c0, n, br);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] += c_r * (v[i] - r[i]);
      }
      if (a.has_ema) {
        const T* e = load_tile(a.v_ema, row, c0, n, be);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] += c_e * (v[i] - e[i]);
      }
      store_tile(a.grad, a.grad_dtype, row * a.dims + c0, n, g);
    }
  }
}

// ---- SDE step ----
template <class T>
void sde_forward(const SdeArgs& a, double* q_part) {
  const int64_t nc = n_chunks(a.dims), tasks = a.rows * nc;
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t row = task / nc, c_begin = (task % nc) * CHUNK, c_end = std::min(a.dims, c_begin + CHUNK);
    const SdeRow c = sde_row(a, row);
    const T ax = static_cast<T>(c.a_x), av = static_cast<T>(c.a_v), sc = static_cast<T>(c.scale);
    const T w = static_cast<T>(a.guidance);
    T bx[TILE], bv[TILE], bu[TILE], bn[TILE], mean[TILE], vt[TILE], xi[TILE], o[TILE];
    double q = 0;
    for (int64_t c0 = c_begin; c0 < c_end; c0 += TILE) {
      const int64_t n = std::min(TILE, c_end - c0);
      const T* x = load_tile(a.x, row, c0, n, bx);
      const T* v = load_tile(a.v, row, c0, n, bv);
      v = guided_tile(a, row, c0, n, v, w, bu, vt);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) mean[i] = ax * x[i] + av * v[i];
      store_tile(a.mean, a.mean_dtype, row * a.dims + c0, n, mean);
      T s = 0;
      if (a.log_prob_mode) {
        const T* xn = load_tile(a.x_next, row, c0, n, bn);
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; ++i) s += (xn[i] - mean[i]) * (xn[i] - mean[i]);
      } else {
        const T* z = xi;
        if (a.noise_mode == 1) {
          z = load_tile(a.noise, row, c0, n, bn);
        } else if (a.noise_mode == 2) {
          const int64_t flat = a.offset + row * a.dims + c0;
          float u1[TILE], u2[TILE];
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) philox_uniforms(a.seed, static_cast<uint32_t>(flat + i), &u1[i], &u2[i]);
          for (int64_t i = 0; i < n; ++i) xi[i] = static_cast<T>(box_muller(u1[i], u2[i]));
        } else {
          std::fill(xi, xi + n, T(0));
        }
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < n; ++i) {
          o[i] = mean[i] + sc * z[i];
          s += (sc * z[i]) * (sc * z[i]);
        }
        store_tile(a.out, a.out_dtype, row * a.dims + c0, n, o);
      }
      q += s;
    }
    q_part[task] = q;
  }
}

// g = g_lp kk / D (x' - mean) + g_mean; grad_v = w a_v g, grad_v_uncond = (1 - w) a_v g (a_v g without CFG),
// grad_x = a_x g, grad_x' = -g_lp kk / D (x' - mean)
template <class T>
void sde_backward(const SdeArgs& a) {
  const int64_t nc = n_chunks(a.dims), tasks = a.rows * nc;
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t row = task / nc, c_begin = (task % nc) * CHUNK, c_end = std::min(a.dims, c_begin + CHUNK);
    const SdeRow c = sde_row(a, row);
    const T ax = static_cast<T>(c.a_x), av = static_cast<T>(c.a_v), w = static_cast<T>(a.guidance);
    const T glp = a.grad_log_prob ? static_cast<T>(a.grad_log_prob[row] * c.kk / static_cast<double>(a.dims)) : T(0);
    T bx[TILE], bv[TILE], bu[TILE], bn[TILE], bg[TILE], vt[TILE], dlp[TILE], g[TILE], tmp[TILE];
    for (int64_t c0 = c_begin; c0 < c_end; c0 += TILE) {
      const int64_t n = std::min(TILE, c_end - c0), base = row * a.dims + c0;
      const T* x = load_tile(a.x, row, c0, n, bx);
      const T* v = load_tile(a.v, row, c0, n, bv);
      const T* xn = load_tile(a.x_next, row, c0, n, bn);
      v = guided_tile(a, row, c0, n, v, w, bu, vt);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        dlp[i] = glp * (xn[i] - (ax * x[i] + av * v[i]));
        g[i] = dlp[i];
      }
      if (a.grad_mean.ptr) {
        const T* gm = load_tile(a.grad_mean, row, c0, n, bg);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) g[i] += gm[i];
      }
      const T wv = a.has_uncond ? w : T(1);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) tmp[i] = wv * av * g[i];
      store_tile(a.grad_v, a.grad_v_dtype, base, n, tmp);
      if (a.grad_v_uncond) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) tmp[i] = (T(1) - w) * av * g[i];
        store_tile(a.grad_v_uncond, a.grad_v_uncond_dtype, base, n, tmp);
      }
      if (a.grad_x) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) tmp[i] = ax * g[i];
        store_tile(a.grad_x, a.grad_x_dtype, base, n, tmp);
      }
      if (a.grad_x_next) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) tmp[i] = -dlp[i];
        store_tile(a.grad_x_next, a.grad_x_next_dtype, base, n, tmp);
      }
    }
  }
}

bool all_f64(std::initializer_list<RowsView> views) {
  for (const RowsView& r : views)
    if (r.ptr && r.dtype != DType::f64) return false;
  return true;
}

}  // namespace

void awm_loss_cpu(const AwmLossArgs& a) {
  const int64_t R = a.rows, nc = n_chunks(a.dims), B = R / a.steps;
  const bool f64 = all_f64({a.v, a.target, a.has_ref ? a.v_ref : RowsView{}, a.has_ema ? a.v_ema : RowsView{}});
  std::vector<double> part(3 * R * nc), sums(3 * R, 0.0);
  f64 ? awm_row_sums<double>(a, part.data()) : awm_row_sums<float>(a, part.data());
  for (int64_t i = 0; i < 3 * R; ++i)
    for (int64_t c = 0; c < nc; ++c) sums[i] += part[i * nc + c];
  double pol = 0, kl = 0, kl_ema = 0, clipped = 0;
  for (int64_t b = 0; b < B; ++b) pol += awm_finalise_sample(a, sums.data(), b, &kl, &kl_ema, &clipped);
  double loss = pol / B;
  if (a.has_ref) loss += a.beta * kl / R;
  if (a.has_ema) loss += a.ema_beta * kl_ema / R;
  store_as<double>(a.loss, a.loss_dtype, 0, loss);
  *a.clipfrac = static_cast<float>(clipped / B);
  f64 ? awm_grad<double>(a) : awm_grad<float>(a);
}

void sde_forward_cpu(const SdeArgs& a) {
  const int64_t nc = n_chunks(a.dims);
  const bool f64 = all_f64({a.x, a.v, a.has_uncond ? a.v_uncond : RowsView{},
                            a.noise_mode == 1 ? a.noise : RowsView{}, a.log_prob_mode ? a.x_next : RowsView{}});
  std::vector<double> part(a.rows * nc);
  f64 ? sde_forward<double>(a, part.data()) : sde_forward<float>(a, part.data());
  for (int64_t row = 0; row < a.rows; ++row) {
    double q = 0;
    for (int64_t c = 0; c < nc; ++c) q += part[row * nc + c];
    a.log_prob[row] = static_cast<float>(sde_log_prob_from_q(a, row, q));
  }
}

void sde_backward_cpu(const SdeArgs& a) {
  const bool f64 = all_f64({a.x, a.v, a.x_next, a.has_uncond ? a.v_uncond : RowsView{}, a.grad_mean});
  f64 ? sde_backward<double>(a) : sde_backward<float>(a);
}

}  // namespace awm_fast
