// The five ops of bcdcore.ops as Python functions, shared by both backends (fused_cpu.cpp, fused_cuda_bind.cpp):
// validate the tensors (fused_common.h), describe the step as a bcd::Job, and hand it to the backend's `Run`.
// Keeping this in one place keeps the two modules' signatures, argument names and errors identical.
#pragma once

#include <torch/extension.h>

#include <tuple>

#include "fused_common.h"

namespace bcd {

using Norms = std::tuple<at::Tensor, at::Tensor>;
using RunJob = Norms (*)(const Job& job, const at::Tensor& x);

template <c10::DeviceType kDevice, RunJob Run>
struct Ops {
  static Norms sgd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, double lr, double lam,
                   c10::optional<double> gamma, c10::optional<at::Tensor> out, c10::optional<at::Tensor> skip) {
    Job job;
    check_args("prox_sgd_step_", kDevice, named(x, &g, a, out, nullptr, "", nullptr, ""), job);
    set_mode("prox_sgd_step_", gamma, out.has_value(), job);
    prep_sgd(job, lr, lam);
    fill_ptrs(job, x, &g, a, out, nullptr, nullptr);
    set_skip("prox_sgd_step_", x, skip, job);
    return Run(job, x);
  }

  static Norms momentum(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, const at::Tensor& buf,
                        double lr, double lam, double mu, bool nesterov, c10::optional<double> gamma,
                        c10::optional<at::Tensor> out, c10::optional<at::Tensor> skip) {
    Job job;
    check_args("prox_momentum_step_", kDevice, named(x, &g, a, out, &buf, "buf", nullptr, ""), job);
    set_mode("prox_momentum_step_", gamma, out.has_value(), job);
    prep_momentum(job, lr, lam, mu, nesterov);
    fill_ptrs(job, x, &g, a, out, &buf, nullptr);
    set_skip("prox_momentum_step_", x, skip, job);
    return Run(job, x);
  }

  static Norms adam(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, const at::Tensor& m,
                    const at::Tensor& v, double lr, double lam, double beta1, double beta2, double eps,
                    int64_t step, c10::optional<double> gamma, c10::optional<at::Tensor> out,
                    c10::optional<at::Tensor> skip) {
    Job job;
    check_args("prox_adam_step_", kDevice, named(x, &g, a, out, &m, "m", &v, "v"), job);
    set_mode("prox_adam_step_", gamma, out.has_value(), job);
    prep_adam("prox_adam_step_", job, lr, lam, beta1, beta2, eps, step);
    fill_ptrs(job, x, &g, a, out, &m, &v);
    set_skip("prox_adam_step_", x, skip, job);
    return Run(job, x);
  }

  // The norms pass of the inexactness rule at the current point (writes nothing but the rule state).
  static Norms rule_check(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, const at::Tensor& rule,
                          double lam, double coef, int64_t step) {
    Job job;
    const c10::optional<at::Tensor> none;
    check_args("rule_check_", kDevice, named(x, &g, a, none, nullptr, "", nullptr, ""), job);
    job.form = kNorms;
    job.mode = kNone;
    job.lam = lam;
    job.coef = coef;
    job.index = step;
    fill_ptrs(job, x, &g, a, none, nullptr, nullptr);
    job.rule = check_rule("rule_check_", "rule", x, rule);
    return Run(job, x);
  }

  static void damp(const at::Tensor& x, const at::Tensor& a, double gamma, c10::optional<at::Tensor> out) {
    Job job;
    check_args("damp_", kDevice, named(x, nullptr, a, out, nullptr, "", nullptr, ""), job);
    set_mode("damp_", gamma, out.has_value(), job);
    job.form = kDamp;
    fill_ptrs(job, x, nullptr, a, out, nullptr, nullptr);
    Run(job, x);
  }

  static void set_skip(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& skip, Job& job) {
    if (skip.has_value()) job.skip = check_rule(op, "skip", x, *skip);
  }

  // The Python definitions; the GIL is released while a kernel runs.
  static void define(pybind11::module_& m, const char* doc) {
    namespace py = pybind11;
    m.doc() = doc;
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("sgd", &sgd, "fused proximal SGD step; returns (||r||^2, ||x-a||^2) at the pre-step point",
          py::arg("x"), py::arg("g"), py::arg("a"), py::arg("lr"), py::arg("lam"), py::arg("gamma") = py::none(),
          py::arg("out") = py::none(), py::arg("skip") = py::none(), nogil);
    m.def("momentum", &momentum, "fused proximal heavy-ball step (torch.optim.SGD semantics, dampening 0)",
          py::arg("x"), py::arg("g"), py::arg("a"), py::arg("buf"), py::arg("lr"), py::arg("lam"),
          py::arg("momentum"), py::arg("nesterov") = false, py::arg("gamma") = py::none(),
          py::arg("out") = py::none(), py::arg("skip") = py::none(), nogil);
    m.def("adam", &adam, "fused proximal Adam step (bias-corrected, step counts from 1)", py::arg("x"),
          py::arg("g"), py::arg("a"), py::arg("m"), py::arg("v"), py::arg("lr"), py::arg("lam"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("step"), py::arg("gamma") = py::none(),
          py::arg("out") = py::none(), py::arg("skip") = py::none(), nogil);
    m.def("rule_check", &rule_check,
          "norms pass of the inexactness rule at x; updates the rule state [stopped, r2, d2, k] unless stopped",
          py::arg("x"), py::arg("g"), py::arg("a"), py::arg("rule"), py::arg("lam"), py::arg("coef"),
          py::arg("step"), nogil);
    m.def("damp", &damp, "x <- a + gamma (x - a); with out: out <- that and x <- a", py::arg("x"), py::arg("a"),
          py::arg("gamma"), py::arg("out") = py::none(), nogil);
  }
};

}  // namespace bcd
