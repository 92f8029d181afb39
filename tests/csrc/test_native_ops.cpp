// ctest: the native ops through the torch dispatcher (CPU) against fixed float64 expected values
// (expected_values.h, written by make_expected.py from the float64 torch reference), in float64 (tight) and
// float32 (fp32 tolerance) inputs; the Philox noise against Triton's tl.randn; bad arguments raise.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../../csrc/common.h"
#include "expected_values.h"

using at::Tensor;
using OptT = const std::optional<Tensor>&;
constexpr int64_t R = 4, D = 6;
int failures = 0;

void check(const char* what, const Tensor& got, const std::vector<double>& want, double atol, double rtol) {
  Tensor g = got.to(at::kDouble).contiguous();
  const double* p = g.data_ptr<double>();
  if (static_cast<size_t>(g.numel()) != want.size()) {
    std::printf("FAIL %s: %lld values, expected %zu\n", what, static_cast<long long>(g.numel()), want.size());
    ++failures;
    return;
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(p[i] - want[i]) <= atol + rtol * std::fabs(want[i]))) {
      std::printf("FAIL %s[%zu]: %.17g, expected %.17g\n", what, i, p[i], want[i]);
      ++failures;
      return;
    }
  }
  std::printf("ok   %s\n", what);
}

Tensor field(double a, double b, bool use_sin, at::ScalarType dtype) {
  std::vector<double> x(R * D);
  for (int64_t k = 0; k < R * D; ++k) x[k] = use_sin ? std::sin(a * k + b) : std::cos(a * k + b);
  return at::from_blob(x.data(), {R, 2, 3}, at::kDouble).clone().to(dtype);  // own the data
}
Tensor per_row(std::function<double(int64_t)> f) {
  std::vector<double> x(R);
  for (int64_t r = 0; r < R; ++r) x[r] = f(r);
  return at::from_blob(x.data(), {R}, at::kDouble).clone();
}

using AwmOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using AwmSig = AwmOut(const Tensor&, const Tensor&, const Tensor&, const Tensor&, OptT, OptT, OptT, double, double,
                      c10::string_view, double, double, c10::string_view, c10::string_view, int64_t);
using SdeSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, OptT, OptT,
                                          Tensor&, double, c10::string_view, double, int64_t, int64_t);
using LpSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, OptT,
                                         const Tensor&, double, c10::string_view, double);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          OptT, const Tensor&, OptT, OptT, double, c10::string_view,
                                                          double, bool, bool);

template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void test_awm_loss(at::ScalarType dtype, double atol, double rtol, const std::string& tag) {
  auto awm = op<AwmSig>("awm_fast::awm_loss_native");
  Tensor v = field(0.37, 0.1, true, dtype), u = field(0.23, 0.0, false, dtype);
  Tensor ref = field(0.11, 1.0, true, dtype), ema = field(0.19, 0.5, false, dtype);
  Tensor t = per_row([](int64_t r) { return 0.1 + 0.2 * r; });
  Tensor adv = per_row([](int64_t r) { return 0.5 - 0.3 * r; });
  Tensor old = per_row([](int64_t r) { return -0.05 * (r + 1); });
  auto out = awm.call(v, u, t, adv, ref, ema, std::nullopt, 0.3, 0.7, "ghuber", 0.25, 0.2, "uniform", "exp_first", 1);
  check(("ghuber loss " + tag).c_str(), std::get<0>(out), k_ghuber_loss, 1e-6, 1e-6);
  check(("ghuber log_prob " + tag).c_str(), std::get<1>(out), k_ghuber_log_prob, 1e-6, 1e-6);
  check(("ghuber kl " + tag).c_str(), std::get<3>(out), k_ghuber_kl, 1e-6, 1e-6);
  check(("ghuber grad " + tag).c_str(), std::get<6>(out), k_ghuber_grad, atol, rtol);
  out = awm.call(v, u, t, adv, ref, ema, old, 0.3, 0.7, "huber", 0.25, 0.2, "elbo", "sum_first", 2);
  check(("huber sum_first loss " + tag).c_str(), std::get<0>(out), k_huber_sum_first_loss, 1e-6, 1e-6);
  check(("huber sum_first log_prob " + tag).c_str(), std::get<1>(out), k_huber_sum_first_log_prob, 1e-6, 1e-6);
  check(("huber sum_first kl " + tag).c_str(), std::get<3>(out), k_huber_sum_first_kl, 1e-6, 1e-6);
  check(("huber sum_first grad " + tag).c_str(), std::get<6>(out), k_huber_sum_first_grad, atol, rtol);
}

void test_sde(at::ScalarType dtype, double atol, double rtol, const std::string& tag) {
  auto step = op<SdeSig>("awm_fast::sde_step_native");
  auto lp_op = op<LpSig>("awm_fast::sde_log_prob_native");
  auto bwd = op<BwdSig>("awm_fast::sde_log_prob_backward_native");
  Tensor x = field(0.23, 0.0, false, dtype), v = field(0.37, 0.1, true, dtype);
  Tensor noise = field(0.11, 1.0, true, dtype), vu = field(0.19, 0.5, false, dtype);
  const double s[R] = {1.0, 0.6, 0.3, 0.7}, sn[R] = {0.9, 0.45, 0.0, 0.65};
  Tensor sigma = per_row([&](int64_t r) { return s[r]; }), sigma_next = per_row([&](int64_t r) { return sn[r]; });
  for (const char* kind : {"euler_maruyama", "cps"}) {
    Tensor out = at::empty({R, 2, 3}, x.options());
    auto res = step.call(x, v, sigma, sigma_next, noise, vu, out, 0.7, kind, 2.5, 0, 0);
    const bool em = std::string(kind) == "euler_maruyama";
    check(("sde " + std::string(kind) + " x_next " + tag).c_str(), out,
          em ? k_sde_euler_maruyama_x_next : k_sde_cps_x_next, atol, rtol);
    check(("sde " + std::string(kind) + " log_prob " + tag).c_str(), std::get<0>(res),
          em ? k_sde_euler_maruyama_log_prob : k_sde_cps_log_prob, 1e-5, 1e-5);
  }
  auto lp = lp_op.call(x, v, sigma, sigma_next, std::nullopt, noise, 0.7, "euler_maruyama", 1.0);
  check(("sde log-prob mode " + tag).c_str(), std::get<0>(lp), k_sde_lp_mode_log_prob, 1e-5, 1e-5);
  Tensor g_lp = per_row([](int64_t r) { return r + 1.0; });
  auto grads = bwd.call(x, v, sigma, sigma_next, std::nullopt, noise, g_lp, std::nullopt, 0.7, "euler_maruyama", 1.0,
                        true, false);
  check(("sde log-prob grad_v " + tag).c_str(), std::get<0>(grads), k_sde_lp_mode_grad_v, atol, rtol);
  check(("sde log-prob grad_x " + tag).c_str(), std::get<2>(grads), k_sde_lp_mode_grad_x, atol, rtol);
  if (std::get<3>(grads).numel() != 0) {
    std::printf("FAIL unwanted grad_x_next is not empty\n");
    ++failures;
  }
}

void test_philox() {
  auto step = op<SdeSig>("awm_fast::sde_step_native");
  Tensor z = at::empty({1, 8}, at::kFloat).zero_(), out = at::empty({1, 8}, at::kFloat);
  Tensor sigma = at::empty({1}, at::kDouble).fill_(0.6), sigma_next = at::empty({1}, at::kDouble).fill_(0.5);
  auto res = step.call(z, z, sigma, sigma_next, std::nullopt, std::nullopt, out, 1.0, "cps", 1.0, 123, 5);
  std::vector<double> xi(8), direct(8);  // (x' - mean) / scale, and the raw generator without the op
  const Tensor mean = std::get<1>(res);
  for (int i = 0; i < 8; ++i) {
    xi[i] = (out.data_ptr<float>()[i] - mean.data_ptr<float>()[i]) / 0.5;
    direct[i] = awm_fast::philox_randn(123, 5 + i);
  }
  check("philox randn(123, 5 + i) == Triton tl.randn", at::from_blob(xi.data(), {8}, at::kDouble),
        k_randn_seed123_offset5, 2e-6, 2e-6);
  check("philox raw", at::from_blob(direct.data(), {8}, at::kDouble), k_randn_seed123_offset5, 1e-6, 1e-6);
}

template <class F>
void expect_error(const char* what, F f, const char* needle) {
  try {
    f();
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) {
      std::printf("ok   %s raises\n", what);
      return;
    }
    std::printf("FAIL %s: wrong message: %s\n", what, e.what());
    ++failures;
    return;
  }
  std::printf("FAIL %s: no error\n", what);
  ++failures;
}

void test_errors() {
  auto awm = op<AwmSig>("awm_fast::awm_loss_native");
  Tensor v = field(0.37, 0.1, true, at::kFloat), t = per_row([](int64_t) { return 0.5; });
  expect_error("bad weighting", [&] {
    awm.call(v, v, t, t, std::nullopt, std::nullopt, std::nullopt, 0, 0, "nope", 0.25, 1, "uniform", "exp_first", 1);
  }, "weighting='nope'");
  expect_error("num_timesteps not dividing rows", [&] {
    awm.call(v, v, t, t, std::nullopt, std::nullopt, std::nullopt, 0, 0, "t", 0.25, 1, "uniform", "sum_first", 3);
  }, "num_timesteps=3");
  expect_error("integer v", [&] {
    Tensor iv = v.to(at::kInt);
    awm.call(iv, v, t, t, std::nullopt, std::nullopt, std::nullopt, 0, 0, "t", 0.25, 1, "uniform", "exp_first", 1);
  }, "floating tensor");
}

int main() {
  test_awm_loss(at::kDouble, 1e-12, 1e-10, "fp64");
  test_awm_loss(at::kFloat, 1e-6, 1e-4, "fp32");
  test_sde(at::kDouble, 1e-12, 1e-10, "fp64");
  test_sde(at::kFloat, 1e-5, 1e-4, "fp32");
  test_philox();
  test_errors();
  std::printf(failures ? "%d FAILED\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
