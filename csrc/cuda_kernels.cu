// CUDA implementation of the fused ops, behind a C ABI (kernels.h) so nvcc never parses torch headers.
//
// Same algorithm as the Triton kernels (kernels/awm_loss.py, kernels/sde_step.py):
//   AWM loss: (1) a 1-D grid of (row, chunk) blocks writes float32 partial sums S_u, S_ref, S_ema;
//             (2) one block reduces them per row in float64 and finalises every sample (common.h:
//             awm_finalise_sample): log-prob, ratio, clip, KL, the loss and the per-row coefficients;
//             (3) the (row, chunk) grid writes grad_v = c_u (v - u) + c_ref (v - v_ref) + c_ema (v - v_ema).
//   SDE step: (row, chunk) blocks write mean = a_x x + a_v v~ and x' = mean + scale xi (xi from a tensor or
//             Philox randn(seed, offset + i)) with partial sums of (x' - mean)^2; one block turns them into
//             log p; the backward grid writes the gradients of log p and mean (common.h: sde_row).
// Inputs of any float dtype are converted on load (the dtype switch is uniform per block); math in float32.
#include <cuda_runtime.h>

#include "common.h"

namespace awm_fast {
namespace {

constexpr int THREADS = 256;
constexpr int64_t TARGET_BLOCKS = 1024;  // enough (row, chunk) blocks to fill 132 SMs

struct Chunking {
  int64_t chunk, n_chunks;
};

Chunking chunking(int64_t rows, int64_t dims) {
  const int64_t per_block = (rows * dims + TARGET_BLOCKS - 1) / TARGET_BLOCKS;
  int64_t chunk = ((per_block + THREADS - 1) / THREADS) * THREADS;
  chunk = chunk < 4 * THREADS ? 4 * THREADS : chunk;
  return {chunk, (dims + chunk - 1) / chunk};
}

__device__ float block_sum(float v) {
  __shared__ float shared[THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();  // the previous call's readers are done with `shared`
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;  // valid in thread 0
}

__device__ __forceinline__ float ld(const RowsView& r, int64_t row, int64_t i) {
  return load_as<float>(r.ptr, r.dtype, row * r.stride + i);
}

__global__ void awm_sums_kernel(const AwmLossArgs a, float* part, int64_t chunk, int64_t nc) {
  const int64_t row = blockIdx.x / nc, c = blockIdx.x % nc, R = a.rows;
  const int64_t end = min(a.dims, (c + 1) * chunk);
  float su = 0.f, sr = 0.f, se = 0.f;
  for (int64_t i = c * chunk + threadIdx.x; i < end; i += blockDim.x) {
    const float v = ld(a.v, row, i), du = v - ld(a.target, row, i);
    su += du * du;
    if (a.has_ref) {
      const float d = v - ld(a.v_ref, row, i);
      sr += d * d;
    }
    if (a.has_ema) {
      const float d = v - ld(a.v_ema, row, i);
      se += d * d;
    }
  }
  su = block_sum(su);
  sr = block_sum(sr);
  se = block_sum(se);
  if (threadIdx.x == 0) {
    part[(0 * R + row) * nc + c] = su;
    part[(1 * R + row) * nc + c] = sr;
    part[(2 * R + row) * nc + c] = se;
  }
}

// work: 3 R row sums, then 4 B per-sample values (policy loss, kl sum, kl_ema sum, clipped)
__global__ void awm_finalise_kernel(const AwmLossArgs a, const float* part, int64_t nc, double* work) {
  const int64_t R = a.rows, B = R / a.steps;
  double* sums = work;
  double* per = work + 3 * R;
  for (int64_t i = threadIdx.x; i < 3 * R; i += blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < nc; ++c) s += part[i * nc + c];
    sums[i] = s;
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    double kl = 0.0, kl_ema = 0.0, clipped = 0.0;
    per[b] = awm_finalise_sample(a, sums, b, &kl, &kl_ema, &clipped);
    per[B + b] = kl;
    per[2 * B + b] = kl_ema;
    per[3 * B + b] = clipped;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double pol = 0.0, kl = 0.0, kl_ema = 0.0, clipped = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      pol += per[b];
      kl += per[B + b];
      kl_ema += per[2 * B + b];
      clipped += per[3 * B + b];
    }
    double loss = pol / B;
    if (a.has_ref) loss += a.beta * kl / R;
    if (a.has_ema) loss += a.ema_beta * kl_ema / R;
    store_as<double>(a.loss, a.loss_dtype, 0, loss);
    *a.clipfrac = static_cast<float>(clipped / B);
  }
}

__global__ void awm_grad_kernel(const AwmLossArgs a, int64_t chunk, int64_t nc) {
  const int64_t row = blockIdx.x / nc, c = blockIdx.x % nc, R = a.rows;
  const int64_t end = min(a.dims, (c + 1) * chunk);
  const float c_u = load_as<float>(a.coefs, a.coef_dtype, row);
  const float c_r = load_as<float>(a.coefs, a.coef_dtype, R + row);
  const float c_e = load_as<float>(a.coefs, a.coef_dtype, 2 * R + row);
  for (int64_t i = c * chunk + threadIdx.x; i < end; i += blockDim.x) {
    const float v = ld(a.v, row, i);
    float g = c_u * (v - ld(a.target, row, i));
    if (a.has_ref) g += c_r * (v - ld(a.v_ref, row, i));
    if (a.has_ema) g += c_e * (v - ld(a.v_ema, row, i));
    store_as<float>(a.grad, a.grad_dtype, row * a.dims + i, g);
  }
}

__device__ __forceinline__ float guided(const SdeArgs& a, int64_t row, int64_t i, float w) {
  const float v = ld(a.v, row, i);
  if (!a.has_uncond) return v;
  const float u = ld(a.v_uncond, row, i);
  return u + w * (v - u);
}

__global__ void sde_forward_kernel(const SdeArgs a, float* part, int64_t chunk, int64_t nc) {
  const int64_t row = blockIdx.x / nc, c = blockIdx.x % nc;
  const int64_t end = min(a.dims, (c + 1) * chunk);
  const SdeRow k = sde_row(a, row);
  const float ax = k.a_x, av = k.a_v, sc = k.scale, w = a.guidance;
  float q = 0.f;
  for (int64_t i = c * chunk + threadIdx.x; i < end; i += blockDim.x) {
    const float mean = ax * ld(a.x, row, i) + av * guided(a, row, i, w);
    const int64_t flat = row * a.dims + i;
    store_as<float>(a.mean, a.mean_dtype, flat, mean);
    float diff;
    if (a.log_prob_mode) {
      diff = ld(a.x_next, row, i) - mean;
    } else {
      float xi = 0.f;
      if (a.noise_mode == 1) xi = ld(a.noise, row, i);
      if (a.noise_mode == 2) xi = philox_randn(a.seed, static_cast<uint32_t>(a.offset + flat));
      diff = sc * xi;
      store_as<float>(a.out, a.out_dtype, flat, mean + diff);
    }
    q += diff * diff;
  }
  q = block_sum(q);
  if (threadIdx.x == 0) part[row * nc + c] = q;
}

__global__ void sde_log_prob_kernel(const SdeArgs a, const float* part, int64_t nc) {
  for (int64_t row = threadIdx.x; row < a.rows; row += blockDim.x) {
    double q = 0.0;
    for (int64_t c = 0; c < nc; ++c) q += part[row * nc + c];
    a.log_prob[row] = static_cast<float>(sde_log_prob_from_q(a, row, q));
  }
}

__global__ void sde_backward_kernel(const SdeArgs a, int64_t chunk, int64_t nc) {
  const int64_t row = blockIdx.x / nc, c = blockIdx.x % nc;
  const int64_t end = min(a.dims, (c + 1) * chunk);
  const SdeRow k = sde_row(a, row);
  const float ax = k.a_x, av = k.a_v, w = a.guidance;
  const float glp = a.grad_log_prob ? static_cast<float>(a.grad_log_prob[row] * k.kk / a.dims) : 0.f;
  for (int64_t i = c * chunk + threadIdx.x; i < end; i += blockDim.x) {
    const int64_t flat = row * a.dims + i;
    const float dlp = glp * (ld(a.x_next, row, i) - (ax * ld(a.x, row, i) + av * guided(a, row, i, w)));
    float g = dlp;
    if (a.grad_mean.ptr) g += ld(a.grad_mean, row, i);
    store_as<float>(a.grad_v, a.grad_v_dtype, flat, (a.has_uncond ? w : 1.f) * av * g);
    if (a.grad_v_uncond) store_as<float>(a.grad_v_uncond, a.grad_v_uncond_dtype, flat, (1.f - w) * av * g);
    if (a.grad_x) store_as<float>(a.grad_x, a.grad_x_dtype, flat, ax * g);
    if (a.grad_x_next) store_as<float>(a.grad_x_next, a.grad_x_next_dtype, flat, -dlp);
  }
}

int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

}  // namespace
}  // namespace awm_fast

using namespace awm_fast;

extern "C" int64_t awm_fast_cuda_scratch_bytes(int64_t rows, int64_t dims) {
  const Chunking ch = chunking(rows, dims);
  return align256(3 * rows * ch.n_chunks * sizeof(float)) + 7 * rows * sizeof(double);
}

extern "C" int awm_fast_awm_loss_cuda(const AwmLossArgs* a, void* scratch, void* stream) {
  const Chunking ch = chunking(a->rows, a->dims);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* part = static_cast<float*>(scratch);
  double* work = reinterpret_cast<double*>(static_cast<char*>(scratch) +
                                           align256(3 * a->rows * ch.n_chunks * sizeof(float)));
  const unsigned blocks = static_cast<unsigned>(a->rows * ch.n_chunks);
  awm_sums_kernel<<<blocks, THREADS, 0, s>>>(*a, part, ch.chunk, ch.n_chunks);
  awm_finalise_kernel<<<1, THREADS, 0, s>>>(*a, part, ch.n_chunks, work);
  awm_grad_kernel<<<blocks, THREADS, 0, s>>>(*a, ch.chunk, ch.n_chunks);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int awm_fast_sde_forward_cuda(const SdeArgs* a, void* scratch, void* stream) {
  const Chunking ch = chunking(a->rows, a->dims);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  float* part = static_cast<float*>(scratch);
  const unsigned blocks = static_cast<unsigned>(a->rows * ch.n_chunks);
  sde_forward_kernel<<<blocks, THREADS, 0, s>>>(*a, part, ch.chunk, ch.n_chunks);
  sde_log_prob_kernel<<<1, THREADS, 0, s>>>(*a, part, ch.n_chunks);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int awm_fast_sde_backward_cuda(const SdeArgs* a, void* stream) {
  const Chunking ch = chunking(a->rows, a->dims);
  const unsigned blocks = static_cast<unsigned>(a->rows * ch.n_chunks);
  sde_backward_kernel<<<blocks, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(*a, ch.chunk, ch.n_chunks);
  return static_cast<int>(cudaGetLastError());
}
