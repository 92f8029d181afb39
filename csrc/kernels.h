// Raw entry points of the fused ops, free of torch headers: the CPU implementation (cpu_kernels.cpp) and the
// CUDA one (cuda_kernels.cu, a C ABI so that nvcc never parses torch). ops.cpp turns tensors into these.
//
// Latent-sized inputs are (R, D) row views with unit inner stride and a row stride in elements, of any of
// the four float dtypes; per-row inputs (t, advantages, old_log_prob, sigma, sigma_next, grad_log_prob) are
// contiguous float64 arrays of R values; per-row outputs are float32 arrays of R values.
#pragma once
#include <cstdint>

namespace awm_fast {

enum class DType : int32_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

struct RowsView {
  const void* ptr = nullptr;
  int64_t stride = 0;  // elements between rows
  DType dtype = DType::f32;
};

// AWM loss forward (values + dLoss/dv). weighting: 0 uniform, 1 t, 2 t2, 3 huber, 4 ghuber. steps = T for
// ratio_mode "sum_first" (rows timestep-major), 1 for "exp_first".
struct AwmLossArgs {
  int64_t rows = 0, dims = 0, steps = 1;
  RowsView v, target, v_ref, v_ema;
  bool has_ref = false, has_ema = false, elbo = false;
  int32_t weighting = 4;
  const double* t = nullptr;
  const double* advantages = nullptr;
  const double* old_log_prob = nullptr;  // nullptr: on-policy
  double beta = 0, ema_beta = 0, ghuber_power = 0.25, clip_range = 1;
  // outputs
  void* loss = nullptr;  // scalar, dtype loss_dtype (float64 for float64 v, else float32)
  DType loss_dtype = DType::f32;
  float* clipfrac = nullptr;  // scalar
  float *log_prob = nullptr, *mse = nullptr, *kl = nullptr, *kl_ema = nullptr;
  void* coefs = nullptr;  // (3, R): c_u, c_ref, c_ema
  DType coef_dtype = DType::f32;
  void* grad = nullptr;  // (R, D) contiguous, dtype grad_dtype
  DType grad_dtype = DType::f32;
  int32_t num_threads = 1;  // CPU only
};

// SDE step. kind: 0 euler_maruyama, 1 cps, 2 ode. noise_mode: 0 none, 1 the `noise` view, 2 Philox
// randn(seed, offset + i) for flat index i. Sampling writes `out` (contiguous); log-prob mode reads `x_next`.
struct SdeArgs {
  int64_t rows = 0, dims = 0;
  RowsView x, v, v_uncond, noise, x_next, grad_mean;
  bool has_uncond = false, log_prob_mode = false;
  int32_t kind = 0, noise_mode = 0;
  const double* sigma = nullptr;
  const double* sigma_next = nullptr;
  double noise_level = 0.7, sin_a = 0, cos_a = 1, guidance = 1;
  uint64_t seed = 0;
  int64_t offset = 0;
  // forward outputs
  void* out = nullptr;  // x' (sampling), contiguous, dtype out_dtype
  DType out_dtype = DType::f32;
  void* mean = nullptr;  // contiguous, dtype mean_dtype
  DType mean_dtype = DType::f32;
  float* log_prob = nullptr;
  // backward: grad_log_prob (R, float64, or nullptr), grad_mean (a view, ptr nullptr when absent); outputs
  // contiguous; grad_v_uncond / grad_x / grad_x_next nullptr when not wanted
  const double* grad_log_prob = nullptr;
  void *grad_v = nullptr, *grad_v_uncond = nullptr, *grad_x = nullptr, *grad_x_next = nullptr;
  DType grad_v_dtype = DType::f32, grad_v_uncond_dtype = DType::f32, grad_x_dtype = DType::f32,
        grad_x_next_dtype = DType::f32;
  int32_t num_threads = 1;
};

// CPU (OpenMP over (row, chunk) tiles): float64 math when every latent input is float64, float32 otherwise,
// row sums accumulated in float64.
void awm_loss_cpu(const AwmLossArgs& a);
void sde_forward_cpu(const SdeArgs& a);
void sde_backward_cpu(const SdeArgs& a);

}  // namespace awm_fast

// CUDA (cuda_kernels.cu): float32 math (float64 per-row finalisation); return a cudaError_t value (0 = success).
extern "C" {
int awm_fast_awm_loss_cuda(const awm_fast::AwmLossArgs* a, void* scratch, void* stream);
int awm_fast_sde_forward_cuda(const awm_fast::SdeArgs* a, void* scratch, void* stream);
int awm_fast_sde_backward_cuda(const awm_fast::SdeArgs* a, void* stream);
// bytes of device scratch the two forward launchers need (partial sums, per-row work)
int64_t awm_fast_cuda_scratch_bytes(int64_t rows, int64_t dims);
}
