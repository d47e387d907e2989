// CPU kernel body of the fused step. NO include guard and NO includes of its own on purpose: fused_cpu.cpp
// includes this file once per instruction set, each time inside its own namespace and under its own
// `#pragma GCC target`, so that every template below (and the per-element math of fused_math.h it includes in
// the same namespace) is compiled for that instruction set; runtime dispatch picks one (see fused_cpu.cpp).
// Everything it needs (bcd::Job, fused_dispatch.h, <cstdint>, <cmath>, c10 half conversions) is included first.
//
// Work is split into fixed tasks of kTask elements, independent of the thread count: a task's squared norms
// are summed in float over kSub-element pieces (vectorised with `omp simd reduction`) and those piece sums in
// double, each task writes its two partials, and the caller adds the partials in task order. The result is
// therefore bitwise reproducible whatever the number of threads.

#include "fused_math.h"

constexpr int64_t kTask = 16384;
constexpr int64_t kSub = 512;

// Tasks [t0, t1) of one dtype/form/mode: load, the element functor (rounding as torch's CPU kernels), the
// write of `MODE`, and the norm partials. Instantiated by bcd::dispatch (fused_dispatch.h).
template <typename T, int FORM, int MODE, bool NEST>
struct Tasks {
  using Op = Elem<T, FORM, NEST, TorchCpuRounding>;
  using S = typename Op::S;
  using M = typename Op::M;

  static void run(const bcd::Job& job, double* partials, int64_t t0, int64_t t1) {
    S* __restrict__ x = static_cast<S*>(job.x);
    const S* __restrict__ g = static_cast<const S*>(job.g);
    const S* __restrict__ a = static_cast<const S*>(job.a);
    S* __restrict__ out = static_cast<S*>(job.out);
    M* __restrict__ s0 = static_cast<M*>(job.s0);
    M* __restrict__ s1 = static_cast<M*>(job.s1);
    const Op op{Consts<M>::make(job)};
    const int64_t n = job.n;

    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = t * kTask;
      const int64_t end = begin + kTask < n ? begin + kTask : n;
      double r2t = 0.0, d2t = 0.0;
      for (int64_t s = begin; s < end; s += kSub) {
        const int64_t se = s + kSub < end ? s + kSub : end;
        M r2 = 0, d2 = 0;
#pragma omp simd reduction(+ : r2, d2)
        for (int64_t i = s; i < se; ++i) {
          const M am = Op::IO::ld(a[i]);
          const auto o = op(Op::IO::ld(x[i]), am, Op::kReadsG ? Op::IO::ld(g[i]) : M(0),
                            Op::kState0 ? s0[i] : M(0), Op::kState1 ? s1[i] : M(0));
          if constexpr (Op::kNorms) {
            r2 += o.rr;
            d2 += o.dd;
          }
          if constexpr (Op::kState0) s0[i] = o.s0;
          if constexpr (Op::kState1) s1[i] = o.s1;
          op.template write<MODE>(x[i], bcd::writes_out(MODE) ? out[i] : x[i], a[i], am, o.x);
        }
        r2t += static_cast<double>(r2);
        d2t += static_cast<double>(d2);
      }
      if (partials != nullptr) {
        partials[2 * t] = r2t;
        partials[2 * t + 1] = d2t;
      }
    }
  }

  // kNone with a step form: the bindings never produce it (a skipped step is turned into kNorms first).
  static void unsupported(const bcd::Job&, double*, int64_t, int64_t) {}
};

// Entry point of this instruction set: tasks [t0, t1) of `job`.
void run_tasks(const bcd::Job& job, double* partials, int64_t t0, int64_t t1) {
  bcd::dispatch<Tasks>(job, partials, t0, t1);
}
