// Argument validation and the host-side description of one fused step, shared by the CPU extension
// (fused_cpu.cpp) and the CUDA extension's binding (fused_cuda_bind.cpp). Host code only.
//
// Contract (see csrc/README.md and bcdcore/ops.py, whose `reference` backend is the oracle):
//   x, g, a, out : same dtype (float32, float64, bfloat16 or float16), same device, contiguous, same numel
//   state (buf / m, v): the math dtype (float32 for float32/bfloat16/float16 parameters, float64 for float64)
//   no two of these tensors may share memory (the kernels read and write through restrict pointers)
// Bad arguments raise ValueError (TypeError for a wrong dtype), naming the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fused_job.h"

namespace bcd {

// Python's spelling of a dtype, for error messages.
inline std::string dname(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline int dtype_code(const char* op, const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK_TYPE(false, "bcdcore.", op, ": x has dtype ", dname(x.scalar_type()),
                       "; supported: float32, float64, bfloat16, float16");
  }
  return -1;
}

inline at::ScalarType math_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Named {
  const char* name;
  const at::Tensor* t;
  bool state;  // state buffers hold the math dtype
};

// Validates the call and fills the pointers of `job`. `want` is the device type of the backend.
inline void check_args(const char* op, c10::DeviceType want, const std::vector<Named>& ts, Job& job) {
  const at::Tensor& x = *ts[0].t;
  TORCH_CHECK_VALUE(x.defined(), "bcdcore.", op, ": x is undefined");
  const char* backend = want == c10::DeviceType::CUDA ? "cuda" : "cpu";
  TORCH_CHECK_VALUE(x.device().type() == want, "bcdcore.", op, ": the ", backend, " backend needs ",
                    want == c10::DeviceType::CUDA ? "CUDA" : "CPU", " tensors, but x is on ", x.device());
  job.dtype = dtype_code(op, x);
  const at::ScalarType mt = math_type(x);
  for (const Named& nt : ts) {
    const at::Tensor& t = *nt.t;
    TORCH_CHECK_VALUE(t.defined(), "bcdcore.", op, ": ", nt.name, " is undefined");
    TORCH_CHECK_VALUE(t.device() == x.device(), "bcdcore.", op, ": device mismatch: ", nt.name, " is on ",
                      t.device(), " but x is on ", x.device());
    if (nt.state) {
      TORCH_CHECK_TYPE(t.scalar_type() == mt, "bcdcore.", op, ": state buffer ", nt.name, " must be ", dname(mt), " for ",
                       dname(x.scalar_type()), " parameters, got ", dname(t.scalar_type()));
    } else {
      TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "bcdcore.", op, ": dtype mismatch: ", nt.name,
                       " is ", dname(t.scalar_type()), " but x is ",
                       dname(x.scalar_type()));
    }
    TORCH_CHECK_VALUE(t.numel() == x.numel(), "bcdcore.", op, ": size mismatch: ", nt.name, " has ",
                      t.numel(), " elements ", t.sizes(), " but x has ", x.numel(), " ", x.sizes());
    TORCH_CHECK_VALUE(t.is_contiguous(), "bcdcore.", op, ": ", nt.name,
                      " must be contiguous (the fused ops work on flat buffers); got strides ", t.strides());
  }
  if (x.numel() > 0) {
    for (size_t i = 0; i < ts.size(); ++i) {
      for (size_t j = i + 1; j < ts.size(); ++j) {
        const auto st = at::get_overlap_status(*ts[i].t, *ts[j].t);
        TORCH_CHECK_VALUE(st == at::MemOverlapStatus::No, "bcdcore.", op, ": ", ts[i].name, " and ",
                          ts[j].name, " share memory; the fused ops need distinct buffers");
      }
    }
  }
  job.n = x.numel();
}

// A rule state (see fused_job.h): 4 contiguous float64 values on x's device. Returns its pointer.
inline double* check_rule(const char* op, const char* name, const at::Tensor& x, const at::Tensor& rule) {
  TORCH_CHECK_VALUE(rule.defined(), "bcdcore.", op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(rule.scalar_type() == at::kDouble, "bcdcore.", op, ": ", name,
                   " (the rule state) must be torch.float64, got ", dname(rule.scalar_type()));
  TORCH_CHECK_VALUE(rule.numel() == kRuleLen && rule.is_contiguous(), "bcdcore.", op, ": ", name,
                    " (the rule state) must be ", kRuleLen, " contiguous values, got ", rule.sizes());
  TORCH_CHECK_VALUE(rule.device() == x.device(), "bcdcore.", op, ": device mismatch: ", name, " is on ",
                    rule.device(), " but x is on ", x.device());
  return rule.data_ptr<double>();
}

// gamma=None: a plain step, or with out= the undamped point moved to out (kOut). gamma=γ: the damped writes.
inline int set_mode(c10::optional<double> gamma, bool has_out, Job& job) {
  if (!gamma.has_value()) {
    job.mode = has_out ? kOut : kPlain;
  } else {
    job.gamma = *gamma;
    job.mode = has_out ? kDampedOut : kDamped;
  }
  return job.mode;
}

// The tensors of one call, in the order the kernels name them, ready for check_args.
inline std::vector<Named> named(const at::Tensor& x, const at::Tensor* g, const at::Tensor& a,
                                const c10::optional<at::Tensor>& out, const at::Tensor* s0, const char* s0name,
                                const at::Tensor* s1, const char* s1name) {
  std::vector<Named> v;
  v.reserve(6);
  v.push_back({"x", &x, false});
  if (g) v.push_back({"g", g, false});
  v.push_back({"a", &a, false});
  if (s0) v.push_back({s0name, s0, true});
  if (s1) v.push_back({s1name, s1, true});
  if (out.has_value()) v.push_back({"out", &*out, false});
  return v;
}

inline void fill_ptrs(Job& job, const at::Tensor& x, const at::Tensor* g, const at::Tensor& a,
                      const c10::optional<at::Tensor>& out, const at::Tensor* s0, const at::Tensor* s1) {
  job.x = x.data_ptr();
  job.g = g ? g->data_ptr() : nullptr;
  job.a = a.data_ptr();
  job.out = out.has_value() ? out->data_ptr() : nullptr;
  job.s0 = s0 ? s0->data_ptr() : nullptr;
  job.s1 = s1 ? s1->data_ptr() : nullptr;
}

// Host-side preparation of each form's constants (double; the kernel rounds them to the math type).
inline void prep_sgd(Job& j, double lr, double lam) {
  j.form = kSgd;
  j.lr = lr;
  j.lam = lam;
}

inline void prep_momentum(Job& j, double lr, double lam, double mu, bool nesterov) {
  j.form = kMomentum;
  j.lr = lr;
  j.lam = lam;
  j.mu = mu;
  j.nesterov = nesterov;
}

inline void prep_adam(const char* op, Job& j, double lr, double lam, double b1, double b2, double eps,
                      int64_t step) {
  TORCH_CHECK_VALUE(step >= 1, "bcdcore.", op, ": adam step counts from 1, got ", step);
  j.form = kAdam;
  j.lr = lr;
  j.lam = lam;
  j.b1 = b1;
  j.omb1 = 1.0 - b1;  // Python's `1 - beta1`
  j.b2 = b2;
  j.omb2 = 1.0 - b2;
  j.c1 = 1.0 - std::pow(b1, static_cast<double>(step));  // Python's `1 - beta1 ** step`
  j.c2 = 1.0 - std::pow(b2, static_cast<double>(step));
  j.eps = eps;
}

}  // namespace bcd
