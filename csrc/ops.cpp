// The native fused ops as torch custom ops in the `awm_fast` namespace, with the schemas of the Triton ops
// (awm_fast/ops/triton_backend.py):
//
//   awm_loss_native      -> (loss, log_prob, mse, kl, kl_ema, clipfrac, grad_v, coefs)
//   sde_step_native      sampling: writes x' into `out` (contiguous, x's dtype), returns (log_prob, mean)
//   sde_log_prob_native  log-prob mode: (log_prob, mean)
//   sde_log_prob_backward_native  (grad_v, grad_v_uncond, grad_x, grad_x_next); a gradient that is not
//                        wanted comes back as an empty (0,) tensor
//
// CPU kernels (cpu_kernels.cpp) are registered for the CPU key; the CUDA kernels (cuda_kernels.cu, a C ABI)
// for the CUDA key when built with AWM_FAST_WITH_CUDA. Autograd and fake (meta) implementations are
// registered from Python (awm_fast/ops/native_backend.py). Bad arguments raise ValueError / TypeError.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "kernels.h"

#ifdef AWM_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace awm_fast {
namespace {

using at::Tensor;
using c10::optional;
using OptT = const optional<Tensor>&;

DType dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default: TORCH_CHECK_TYPE(false, name, " must be a floating tensor (fp16/bf16/fp32/fp64), got dtype ",
                              t.scalar_type());
  }
  return DType::f32;
}

// Keeps the (R, D) views and float64 copies alive while a kernel runs.
struct Holder {
  std::vector<Tensor> keep;
  at::Device device = at::kCPU;

  RowsView rows(const Tensor& t, int64_t rows, const char* name, const Tensor& like) {
    TORCH_CHECK_VALUE(t.sizes() == like.sizes(), name, " has shape ", t.sizes(), " but should have shape ",
                      like.sizes());
    TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the inputs are on ", device);
    Tensor x = t.reshape({rows, -1});
    if (x.size(1) > 1 && x.stride(1) != 1) x = x.contiguous();
    keep.push_back(x);
    return RowsView{x.data_ptr(), x.stride(0), dtype_code(x, name)};
  }
  const double* per_row(const Tensor& t, int64_t rows, const char* name) {
    dtype_code(t, name);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, name, " must have shape (", rows,
                      ",) (one value per row), got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == device, name, " is on ", t.device(), " but the inputs are on ", device);
    Tensor d = t.to(at::kDouble).contiguous();
    keep.push_back(d);
    return d.data_ptr<double>();
  }
};

int32_t choice(c10::string_view value, std::initializer_list<const char*> names, const char* what) {
  int32_t i = 0;
  std::string all;
  for (const char* n : names) {
    if (value == n) return i;
    all += std::string(i ? ", " : "") + n;
    ++i;
  }
  TORCH_CHECK_VALUE(false, what, "='", std::string(value), "' is not one of (", all, ")");
  return -1;
}

int64_t check_rows(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 2, name, " must have shape (rows, ...) with at least 2 dims, got ", x.sizes());
  dtype_code(x, name);
  return x.size(0);
}

#ifdef AWM_FAST_WITH_CUDA
void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "awm_fast CUDA kernel ", what, " failed with cudaError ", err);
}
#endif

using Out8 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Out8 awm_loss_native(const Tensor& v, const Tensor& target, const Tensor& t, const Tensor& advantages,
                     OptT v_ref, OptT v_ema, OptT old_log_prob, double beta, double ema_beta,
                     c10::string_view weighting, double ghuber_power, double clip_range,
                     c10::string_view kl_weighting, c10::string_view ratio_mode, int64_t num_timesteps) {
  const int64_t R = check_rows(v, "v");
  Holder h;
  h.device = v.device();
  AwmLossArgs a;
  a.rows = R;
  a.dims = R ? v.numel() / R : 0;
  TORCH_CHECK_VALUE(R > 0 && a.dims > 0, "v must not be empty, got shape ", v.sizes());
  a.weighting = choice(weighting, {"uniform", "t", "t2", "huber", "ghuber"}, "weighting");
  a.elbo = choice(kl_weighting, {"uniform", "elbo"}, "kl_weighting") == 1;
  const bool sum_first = choice(ratio_mode, {"exp_first", "sum_first"}, "ratio_mode") == 1;
  TORCH_CHECK_VALUE(num_timesteps >= 1 && R % num_timesteps == 0, "num_timesteps=", num_timesteps,
                    " must be a positive int dividing the ", R, " rows");
  TORCH_CHECK_VALUE(ghuber_power > 0, "ghuber_power must be > 0, got ", ghuber_power);
  TORCH_CHECK_VALUE(clip_range > 0, "clip_range must be > 0, got ", clip_range);
  TORCH_CHECK_VALUE(std::isfinite(beta) && std::isfinite(ema_beta), "beta=", beta, " and ema_beta=", ema_beta,
                    " must be finite");
  a.steps = sum_first ? num_timesteps : 1;
  a.v = h.rows(v, R, "v", v);
  a.target = h.rows(target, R, "target", v);
  a.has_ref = v_ref.has_value();
  a.has_ema = v_ema.has_value();
  if (a.has_ref) a.v_ref = h.rows(*v_ref, R, "v_ref", v);
  if (a.has_ema) a.v_ema = h.rows(*v_ema, R, "v_ema", v);
  a.t = h.per_row(t, R, "t");
  a.advantages = h.per_row(advantages, R, "advantages");
  if (old_log_prob.has_value()) a.old_log_prob = h.per_row(*old_log_prob, R, "old_log_prob");
  a.beta = beta;
  a.ema_beta = ema_beta;
  a.ghuber_power = ghuber_power;
  a.clip_range = clip_range;
  const auto f32 = v.options().dtype(at::kFloat);
  const bool f64 = v.scalar_type() == at::kDouble;
  // the loss in the inputs' precision: float64 for float64 v (computed in float64 either way), else float32
  Tensor loss = at::empty({}, v.options().dtype(f64 ? at::kDouble : at::kFloat)), clipfrac = at::empty({}, f32);
  Tensor lp = at::empty({R}, f32), mse = at::empty({R}, f32), kl = at::empty({R}, f32), kle = at::empty({R}, f32);
  Tensor coefs = at::empty({3, R}, v.options().dtype(f64 ? at::kDouble : at::kFloat));
  Tensor grad = at::empty(v.sizes(), v.options());
  a.loss = loss.data_ptr();
  a.loss_dtype = f64 ? DType::f64 : DType::f32;
  a.clipfrac = clipfrac.data_ptr<float>();
  a.log_prob = lp.data_ptr<float>();
  a.mse = mse.data_ptr<float>();
  a.kl = kl.data_ptr<float>();
  a.kl_ema = kle.data_ptr<float>();
  a.coefs = coefs.data_ptr();
  a.coef_dtype = f64 ? DType::f64 : DType::f32;
  a.grad = grad.data_ptr();
  a.grad_dtype = dtype_code(v, "v");
  if (v.is_cuda()) {
#ifdef AWM_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(v.device());
    Tensor scratch = at::empty({awm_fast_cuda_scratch_bytes(R, a.dims)}, v.options().dtype(at::kByte));
    check_cuda(awm_fast_awm_loss_cuda(&a, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "awm_loss");
#endif
  } else {
    a.num_threads = at::get_num_threads();
    awm_loss_cpu(a);
  }
  return {loss, lp, mse, kl, kle, clipfrac, grad, coefs};
}

// Shared argument handling of the three SDE ops.
SdeArgs sde_args(Holder& h, const Tensor& x, const Tensor& v, const Tensor& sigma, const Tensor& sigma_next,
                 OptT v_uncond, double noise_level, c10::string_view kind, double guidance_scale) {
  const int64_t R = check_rows(x, "x");
  h.device = x.device();
  SdeArgs a;
  a.rows = R;
  a.dims = R ? x.numel() / R : 0;
  TORCH_CHECK_VALUE(R > 0 && a.dims > 0, "x must not be empty, got shape ", x.sizes());
  a.kind = choice(kind, {"euler_maruyama", "cps", "ode"}, "kind");
  TORCH_CHECK_VALUE(noise_level >= 0, "noise_level must be >= 0, got ", noise_level);
  a.x = h.rows(x, R, "x", x);
  a.v = h.rows(v, R, "v", x);
  a.has_uncond = v_uncond.has_value();
  if (a.has_uncond) a.v_uncond = h.rows(*v_uncond, R, "v_uncond", x);
  a.sigma = h.per_row(sigma, R, "sigma");
  a.sigma_next = h.per_row(sigma_next, R, "sigma_next");
  a.noise_level = noise_level;
  a.sin_a = std::sin(noise_level * M_PI / 2);
  a.cos_a = std::sqrt(std::max(1.0 - a.sin_a * a.sin_a, 0.0));
  a.guidance = guidance_scale;
  a.num_threads = at::get_num_threads();
  return a;
}

void run_forward(const SdeArgs& a, const Tensor& x) {
  if (x.is_cuda()) {
#ifdef AWM_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    Tensor scratch = at::empty({awm_fast_cuda_scratch_bytes(a.rows, a.dims)}, x.options().dtype(at::kByte));
    check_cuda(awm_fast_sde_forward_cuda(&a, scratch.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "sde_forward");
#endif
  } else {
    sde_forward_cpu(a);
  }
}

std::tuple<Tensor, Tensor> sde_step_native(const Tensor& x, const Tensor& v, const Tensor& sigma,
                                           const Tensor& sigma_next, OptT noise, OptT v_uncond, Tensor& out,
                                           double noise_level, c10::string_view kind, double guidance_scale,
                                           int64_t seed, int64_t offset) {
  Holder h;
  SdeArgs a = sde_args(h, x, v, sigma, sigma_next, v_uncond, noise_level, kind, guidance_scale);
  TORCH_CHECK_VALUE(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                        out.device() == x.device() && out.is_contiguous(),
                    "out must be a contiguous tensor of x's shape, dtype and device");
  TORCH_CHECK_VALUE(seed >= 0, "seed=", seed, " must be >= 0");
  TORCH_CHECK_VALUE(offset >= 0 && offset + x.numel() <= (int64_t(1) << 32), "offset=", offset,
                    " must be >= 0 with offset + x.numel() <= 2^32");
  if (noise.has_value()) a.noise = h.rows(*noise, a.rows, "noise", x);
  a.noise_mode = a.kind == 2 ? 0 : (noise.has_value() ? 1 : 2);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = offset;
  Tensor mean = at::empty(x.sizes(), x.options());
  Tensor lp = at::empty({a.rows}, x.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  a.out_dtype = dtype_code(out, "out");
  a.mean = mean.data_ptr();
  a.mean_dtype = a.out_dtype;
  a.log_prob = lp.data_ptr<float>();
  run_forward(a, x);
  return {lp, mean};
}

std::tuple<Tensor, Tensor> sde_log_prob_native(const Tensor& x, const Tensor& v, const Tensor& sigma,
                                               const Tensor& sigma_next, OptT v_uncond, const Tensor& x_next,
                                               double noise_level, c10::string_view kind, double guidance_scale) {
  Holder h;
  SdeArgs a = sde_args(h, x, v, sigma, sigma_next, v_uncond, noise_level, kind, guidance_scale);
  a.x_next = h.rows(x_next, a.rows, "x_next", x);
  a.log_prob_mode = true;
  Tensor mean = at::empty(x.sizes(), x.options());
  Tensor lp = at::empty({a.rows}, x.options().dtype(at::kFloat));
  a.mean = mean.data_ptr();
  a.mean_dtype = dtype_code(x, "x");
  a.log_prob = lp.data_ptr<float>();
  run_forward(a, x);
  return {lp, mean};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sde_log_prob_backward_native(
    const Tensor& x, const Tensor& v, const Tensor& sigma, const Tensor& sigma_next, OptT v_uncond,
    const Tensor& x_next, OptT grad_log_prob, OptT grad_mean, double noise_level, c10::string_view kind,
    double guidance_scale, bool need_x, bool need_x_next) {
  Holder h;
  SdeArgs a = sde_args(h, x, v, sigma, sigma_next, v_uncond, noise_level, kind, guidance_scale);
  a.x_next = h.rows(x_next, a.rows, "x_next", x);
  if (grad_log_prob.has_value()) a.grad_log_prob = h.per_row(*grad_log_prob, a.rows, "grad_log_prob");
  if (grad_mean.has_value()) a.grad_mean = h.rows(*grad_mean, a.rows, "grad_mean", x);
  auto none = [&] { return at::empty({0}, x.options()); };
  Tensor gv = at::empty(v.sizes(), v.options());
  Tensor gvu = a.has_uncond ? at::empty(v_uncond->sizes(), v_uncond->options()) : none();
  Tensor gx = need_x ? at::empty(x.sizes(), x.options()) : none();
  Tensor gxn = need_x_next ? at::empty(x_next.sizes(), x_next.options()) : none();
  a.grad_v = gv.data_ptr();
  a.grad_v_dtype = dtype_code(v, "v");
  if (a.has_uncond) a.grad_v_uncond = gvu.data_ptr(), a.grad_v_uncond_dtype = dtype_code(gvu, "v_uncond");
  if (need_x) a.grad_x = gx.data_ptr(), a.grad_x_dtype = dtype_code(x, "x");
  if (need_x_next) a.grad_x_next = gxn.data_ptr(), a.grad_x_next_dtype = dtype_code(x_next, "x_next");
  if (x.is_cuda()) {
#ifdef AWM_FAST_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    check_cuda(awm_fast_sde_backward_cuda(&a, c10::cuda::getCurrentCUDAStream().stream()), "sde_backward");
#endif
  } else {
    sde_backward_cpu(a);
  }
  return {gv, gvu, gx, gxn};
}

}  // namespace
}  // namespace awm_fast

TORCH_LIBRARY(awm_fast, m) {
  m.def("awm_loss_native(Tensor v, Tensor target, Tensor t, Tensor advantages, Tensor? v_ref, Tensor? v_ema, "
        "Tensor? old_log_prob, float beta, float ema_beta, str weighting, float ghuber_power, float clip_range, "
        "str kl_weighting, str ratio_mode, int num_timesteps) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sde_step_native(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor? noise, Tensor? v_uncond, "
        "Tensor(a!) out, float noise_level, str kind, float guidance_scale, int seed, int offset) "
        "-> (Tensor, Tensor)");
  m.def("sde_log_prob_native(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor? v_uncond, "
        "Tensor x_next, float noise_level, str kind, float guidance_scale) -> (Tensor, Tensor)");
  m.def("sde_log_prob_backward_native(Tensor x, Tensor v, Tensor sigma, Tensor sigma_next, Tensor? v_uncond, "
        "Tensor x_next, Tensor? grad_log_prob, Tensor? grad_mean, float noise_level, str kind, "
        "float guidance_scale, bool need_x, bool need_x_next) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(awm_fast, CPU, m) {
  m.impl("awm_loss_native", &awm_fast::awm_loss_native);
  m.impl("sde_step_native", &awm_fast::sde_step_native);
  m.impl("sde_log_prob_native", &awm_fast::sde_log_prob_native);
  m.impl("sde_log_prob_backward_native", &awm_fast::sde_log_prob_backward_native);
}

#ifdef AWM_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(awm_fast, CUDA, m) {
  m.impl("awm_loss_native", &awm_fast::awm_loss_native);
  m.impl("sde_step_native", &awm_fast::sde_step_native);
  m.impl("sde_log_prob_native", &awm_fast::sde_log_prob_native);
  m.impl("sde_log_prob_backward_native", &awm_fast::sde_log_prob_backward_native);
}
#endif
