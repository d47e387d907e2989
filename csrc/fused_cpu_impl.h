// CPU kernel body of the fused step. NO include guard and NO includes on purpose: fused_cpu.cpp includes this
// file once per instruction set, each time inside its own namespace and under its own `#pragma GCC target`, so
// that every template below is compiled for that instruction set (runtime dispatch picks one; see
// fused_cpu.cpp). Everything it needs (bcd::Job, <cstdint>, <cmath>, c10 half conversions) is included first.
//
// Work is split into fixed tasks of kTask elements, independent of the thread count: a task's squared norms
// are summed in float over kSub-element pieces (vectorised with `omp simd reduction`) and those piece sums in
// double, each task writes its two partials, and the caller adds the partials in task order. The result is
// therefore bitwise reproducible whatever the number of threads.

constexpr int64_t kTask = 16384;
constexpr int64_t kSub = 512;

// Storage type S as read and written, math type M as computed in; float and double are both.
template <typename T>
struct IoSame {
  using S = T;
  using M = T;
  static inline M ld(const S* p, int64_t i) { return p[i]; }
  static inline void st(S* p, int64_t i, M v) { p[i] = v; }
};

template <typename T>
struct Io;
template <>
struct Io<float> : IoSame<float> {};
template <>
struct Io<double> : IoSame<double> {};

struct BF16Tag {};
struct F16Tag {};

template <>
struct Io<BF16Tag> {
  using S = uint16_t;
  using M = float;
  static inline M ld(const S* p, int64_t i) { return __builtin_bit_cast(float, static_cast<uint32_t>(p[i]) << 16); }
  // round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16(float)
  static inline void st(S* p, int64_t i, M v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    p[i] = (v != v) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
  }
};

template <>
struct Io<F16Tag> {
  using S = uint16_t;
  using M = float;
  static inline M ld(const S* p, int64_t i) { return c10::detail::fp16_ieee_to_fp32_value(p[i]); }
  static inline void st(S* p, int64_t i, M v) { p[i] = c10::detail::fp16_ieee_from_fp32_value(v); }
};

// One task range [t0, t1) of one form/mode. Per element (math type M):
//   d = x - a;  r = g + lam * d;  r2 += r*r;  d2 += d*d
//   sgd:      x_new = x - lr * r
//   momentum: b = mu * buf + r;  buf = b;  x_new = x - lr * (nesterov ? r + mu * b : b)
//   adam:     m = b1 m + (1-b1) r;  v = b2 v + ((1-b2) r) r;  x_new = x - (lr * (m / c1)) / (sqrt(v / c2) + eps)
//   damp:     x_new = x  (no norms)
//   norms:    x_new = x  (the norms only: the rule's pass, or a step whose skip flag is set)
// then the write of `mode` (x <- x_new | x <- a + gamma (x_new - a) | out <- that, x <- a | nothing).
template <typename T, int FORM, int MODE, bool NEST>
void task_range(const bcd::Job& job, double* partials, int64_t t0, int64_t t1) {
  using IO = Io<T>;
  using S = typename IO::S;
  using M = typename IO::M;
  S* __restrict__ x = static_cast<S*>(job.x);
  const S* __restrict__ g = static_cast<const S*>(job.g);
  const S* __restrict__ a = static_cast<const S*>(job.a);
  S* __restrict__ out = static_cast<S*>(job.out);
  M* __restrict__ s0 = static_cast<M*>(job.s0);
  M* __restrict__ s1 = static_cast<M*>(job.s1);
  const M lr = static_cast<M>(job.lr), lam = static_cast<M>(job.lam), mu = static_cast<M>(job.mu);
  const M b1 = static_cast<M>(job.b1), omb1 = static_cast<M>(job.omb1);
  const M b2 = static_cast<M>(job.b2), omb2 = static_cast<M>(job.omb2);
  const M c1 = static_cast<M>(job.c1), c2 = static_cast<M>(job.c2), eps = static_cast<M>(job.eps);
  const M gamma = static_cast<M>(job.gamma);
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
        const M xm = IO::ld(x, i);
        const M am = IO::ld(a, i);
        M xn;
        if constexpr (FORM == bcd::kDamp) {
          xn = xm;
        } else {
          const M d = xm - am;
          const M r = IO::ld(g, i) + lam * d;
          r2 += r * r;
          d2 += d * d;
          if constexpr (FORM == bcd::kNorms) {
            xn = xm;
          } else if constexpr (FORM == bcd::kSgd) {
            xn = xm - lr * r;
          } else if constexpr (FORM == bcd::kMomentum) {
            const M b = mu * s0[i] + r;
            s0[i] = b;
            if constexpr (NEST) {
              xn = xm - lr * (r + mu * b);
            } else {
              xn = xm - lr * b;
            }
          } else {  // adam
            const M mn = b1 * s0[i] + omb1 * r;
            const M vn = b2 * s1[i] + omb2 * r * r;
            s0[i] = mn;
            s1[i] = vn;
            const M mhat = mn / c1;
            const M vhat = vn / c2;
            xn = xm - lr * mhat / (std::sqrt(vhat) + eps);
          }
        }
        if constexpr (MODE == bcd::kPlain) {
          IO::st(x, i, xn);
        } else if constexpr (MODE == bcd::kDamped) {
          IO::st(x, i, am + gamma * (xn - am));
        } else if constexpr (MODE == bcd::kDampedOut) {
          IO::st(out, i, am + gamma * (xn - am));
          x[i] = a[i];
        } else {
          (void)xn;  // kNone: the norms only
        }
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

template <typename T, int FORM, bool NEST>
void by_mode(const bcd::Job& job, double* partials, int64_t t0, int64_t t1) {
  switch (job.mode) {
    case bcd::kPlain: return task_range<T, FORM, bcd::kPlain, NEST>(job, partials, t0, t1);
    case bcd::kDamped: return task_range<T, FORM, bcd::kDamped, NEST>(job, partials, t0, t1);
    case bcd::kDampedOut: return task_range<T, FORM, bcd::kDampedOut, NEST>(job, partials, t0, t1);
    default:
      if constexpr (FORM == bcd::kNorms) return task_range<T, FORM, bcd::kNone, NEST>(job, partials, t0, t1);
  }
}

template <typename T>
void by_form(const bcd::Job& job, double* partials, int64_t t0, int64_t t1) {
  switch (job.form) {
    case bcd::kSgd: return by_mode<T, bcd::kSgd, false>(job, partials, t0, t1);
    case bcd::kMomentum:
      return job.nesterov ? by_mode<T, bcd::kMomentum, true>(job, partials, t0, t1)
                          : by_mode<T, bcd::kMomentum, false>(job, partials, t0, t1);
    case bcd::kAdam: return by_mode<T, bcd::kAdam, false>(job, partials, t0, t1);
    case bcd::kNorms: return by_mode<T, bcd::kNorms, false>(job, partials, t0, t1);
    default: return by_mode<T, bcd::kDamp, false>(job, partials, t0, t1);
  }
}

// Entry point of this instruction set: tasks [t0, t1) of `job`.
void run_tasks(const bcd::Job& job, double* partials, int64_t t0, int64_t t1) {
  switch (job.dtype) {
    case bcd::kF32: return by_form<float>(job, partials, t0, t1);
    case bcd::kF64: return by_form<double>(job, partials, t0, t1);
    case bcd::kBF16: return by_form<BF16Tag>(job, partials, t0, t1);
    default: return by_form<F16Tag>(job, partials, t0, t1);
  }
}
