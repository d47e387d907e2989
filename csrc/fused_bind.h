// The five ops of bcdcore.ops as Python functions, shared by both backends (fused_cpu.cpp, fused_cuda_bind.cpp):
// validate the tensors (fused_common.h), describe the step as a bcd::Job, and hand it to the backend's `Run`.
// Keeping this in one place keeps the two modules' signatures, argument names and errors identical.
#pragma once

#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "fused_common.h"

namespace bcd {

using Norms = std::tuple<at::Tensor, at::Tensor>;
using RunJob = Norms (*)(const Job& job, const at::Tensor& x);
// A multi-slice call: per-slice norms as two tensors of `slices.count` values (undefined for damp).
using RunMultiJob = Norms (*)(const Job& job, const Slices& slices, const at::Tensor& x);

template <c10::DeviceType kDevice, RunJob Run, RunMultiJob RunMulti>
struct Ops {
  static Norms sgd(const at::Tensor& x, const at::Tensor& g, const at::Tensor& a, double lr, double lam,
                   c10::optional<double> gamma, c10::optional<at::Tensor> out, c10::optional<at::Tensor> skip) {
    Job job;
    check_args("prox_sgd_step_", kDevice, named(x, &g, a, out, nullptr, "", nullptr, ""), job);
    set_mode(gamma, out.has_value(), job);
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
    set_mode(gamma, out.has_value(), job);
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
    set_mode(gamma, out.has_value(), job);
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

  static void damp(const at::Tensor& x, const at::Tensor& a, c10::optional<double> gamma,
                   c10::optional<at::Tensor> out) {
    Job job;
    TORCH_CHECK_VALUE(gamma.has_value() || out.has_value(), "bcdcore.damp_: needs gamma= or out=");
    check_args("damp_", kDevice, named(x, nullptr, a, out, nullptr, "", nullptr, ""), job);
    set_mode(gamma, out.has_value(), job);
    job.form = kDamp;
    fill_ptrs(job, x, nullptr, a, out, nullptr, nullptr);
    Run(job, x);
  }

  // The multi-slice form of the step ops and damp: slices [starts[s], ends[s]) of the flat buffers, each with
  // its own lam (ignored by damp) and gamma, the other constants and the write mode shared; one launch on CUDA.
  static Norms multi(const std::string& form, const at::Tensor& x, c10::optional<at::Tensor> g, const at::Tensor& a,
                     c10::optional<at::Tensor> s0, c10::optional<at::Tensor> s1, const std::vector<int64_t>& starts,
                     const std::vector<int64_t>& ends, const std::vector<double>& lams,
                     c10::optional<std::vector<double>> gammas, c10::optional<at::Tensor> out, double lr, double mu,
                     bool nesterov, double beta1, double beta2, double eps, int64_t step) {
    const char* op = "multi_slice_";
    const bool damp = form == "damp", adam = form == "adam", mom = form == "momentum";
    TORCH_CHECK_VALUE(damp || adam || mom || form == "sgd", "bcdcore.", op, ": unknown form '", form,
                      "'; one of sgd, momentum, adam, damp");
    TORCH_CHECK_VALUE(damp || g.has_value(), "bcdcore.", op, ": the ", form, " form needs g");
    TORCH_CHECK_VALUE(!(mom || adam) || s0.has_value(), "bcdcore.", op, ": the ", form, " form needs its state");
    TORCH_CHECK_VALUE(!adam || s1.has_value(), "bcdcore.", op, ": the adam form needs m and v");
    TORCH_CHECK_VALUE(!damp || gammas.has_value() || out.has_value(), "bcdcore.", op, ": damp needs gammas= or out=");
    const at::Tensor* gp = damp ? nullptr : &*g;
    const at::Tensor* p0 = (mom || adam) ? &*s0 : nullptr;
    const at::Tensor* p1 = adam ? &*s1 : nullptr;
    Job job;
    check_args(op, kDevice, named(x, gp, a, out, p0, adam ? "m" : "buf", p1, "v"), job);
    const size_t count = starts.size();
    TORCH_CHECK_VALUE(ends.size() == count, "bcdcore.", op, ": ", count, " starts but ", ends.size(), " ends");
    TORCH_CHECK_VALUE(damp || lams.size() == count, "bcdcore.", op, ": ", count, " slices but ", lams.size(),
                      " lams");
    TORCH_CHECK_VALUE(!gammas.has_value() || gammas->size() == count, "bcdcore.", op, ": ", count,
                      " slices but ", gammas.has_value() ? gammas->size() : 0, " gammas");
    std::vector<int64_t> sizes(count);
    for (size_t s = 0; s < count; ++s) {
      TORCH_CHECK_VALUE(0 <= starts[s] && starts[s] <= ends[s] && ends[s] <= job.n, "bcdcore.", op, ": slice ", s,
                        " [", starts[s], ", ", ends[s], ") is not inside the ", job.n, " elements of x");
      TORCH_CHECK_VALUE(s == 0 || starts[s] >= ends[s - 1], "bcdcore.", op, ": slice ", s, " [", starts[s], ", ",
                        ends[s], ") overlaps or precedes slice ", s - 1, "; slices must be disjoint and in order");
      sizes[s] = ends[s] - starts[s];
    }
    set_mode(gammas.has_value() ? c10::optional<double>(1.0) : c10::nullopt, out.has_value(), job);
    if (damp) {
      job.form = kDamp;
    } else if (adam) {
      prep_adam(op, job, lr, 0.0, beta1, beta2, eps, step);
    } else if (mom) {
      prep_momentum(job, lr, 0.0, mu, nesterov);
    } else {
      prep_sgd(job, lr, 0.0);
    }
    fill_ptrs(job, x, gp, a, out, p0, p1);
    const std::vector<double> no_lams(count, 0.0);
    Slices sl;
    sl.count = static_cast<int64_t>(count);
    sl.start = starts.data();
    sl.n = sizes.data();
    sl.lam = damp ? no_lams.data() : lams.data();
    sl.gamma = gammas.has_value() ? gammas->data() : nullptr;
    return RunMulti(job, sl, x);
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
    m.def("damp", &damp, "x <- a + gamma (x - a); with out: out <- that and x <- a (gamma=None: out <- x)",
          py::arg("x"), py::arg("a"), py::arg("gamma") = py::none(), py::arg("out") = py::none(), nogil);
    m.def("multi", &multi, "the multi-slice form of sgd, momentum, adam and damp: per-slice lam and gamma, "
          "per-slice norms", py::arg("form"), py::arg("x"), py::arg("g"), py::arg("a"), py::arg("s0"), py::arg("s1"),
          py::arg("starts"), py::arg("ends"), py::arg("lams"), py::arg("gammas"), py::arg("out"), py::arg("lr"),
          py::arg("momentum"), py::arg("nesterov"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
          py::arg("step"), nogil);
  }
};

}  // namespace bcd
