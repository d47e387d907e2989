// The one dispatch ladder of the fused ops, used by both backends: from a Job's runtime dtype, form (with the
// nesterov flag) and write mode to a compile-time instantiation Fn<T, FORM, MODE, NEST>::run(job, args...).
//   T     float, double, bcd::BF16Tag, bcd::F16Tag        (Job::dtype)
//   FORM  kSgd, kMomentum, kAdam, kNorms, kDamp             (Job::form; NEST only for kMomentum)
//   MODE  kPlain, kDamped, kDampedOut, kOut; kNone for kNorms (Job::mode: the fused damping)
// The CPU backend instantiates it with its task-range loop (fused_cpu_impl.h, once per instruction set), the
// CUDA backend with its kernel launch (fused_cuda.cu). A combination the bindings never produce (kNone with a
// step form) goes to Fn<...>::unsupported(job, args...), which says what that backend does with it.
// Free of torch and CUDA headers.
#pragma once

#include "fused_job.h"

namespace bcd {
namespace detail {

template <template <typename, int, int, bool> class Fn, typename T, int FORM, bool NEST, typename... A>
inline auto by_mode(const Job& j, A... a) {
  switch (j.mode) {
    case kPlain: return Fn<T, FORM, kPlain, NEST>::run(j, a...);
    case kDamped: return Fn<T, FORM, kDamped, NEST>::run(j, a...);
    case kDampedOut: return Fn<T, FORM, kDampedOut, NEST>::run(j, a...);
    case kOut: return Fn<T, FORM, kOut, NEST>::run(j, a...);
    default:
      if constexpr (FORM == kNorms) {
        return Fn<T, FORM, kNone, NEST>::run(j, a...);
      } else {
        return Fn<T, FORM, kNone, NEST>::unsupported(j, a...);
      }
  }
}

template <template <typename, int, int, bool> class Fn, typename T, typename... A>
inline auto by_form(const Job& j, A... a) {
  switch (j.form) {
    case kSgd: return by_mode<Fn, T, kSgd, false>(j, a...);
    case kMomentum:
      if (j.nesterov) return by_mode<Fn, T, kMomentum, true>(j, a...);
      return by_mode<Fn, T, kMomentum, false>(j, a...);
    case kAdam: return by_mode<Fn, T, kAdam, false>(j, a...);
    case kNorms: return by_mode<Fn, T, kNorms, false>(j, a...);
    default: return by_mode<Fn, T, kDamp, false>(j, a...);
  }
}

}  // namespace detail

// Runs Fn<T, FORM, MODE, NEST>::run(job, args...) for `job`; returns what it returns.
template <template <typename, int, int, bool> class Fn, typename... A>
inline auto dispatch(const Job& j, A... a) {
  switch (j.dtype) {
    case kF32: return detail::by_form<Fn, float>(j, a...);
    case kF64: return detail::by_form<Fn, double>(j, a...);
    case kBF16: return detail::by_form<Fn, BF16Tag>(j, a...);
    default: return detail::by_form<Fn, F16Tag>(j, a...);
  }
}

}  // namespace bcd
