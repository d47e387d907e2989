// The per-element math of the fused update, written once for the CPU and the CUDA kernels (as ATen keeps the
// math of its fused Adam in one functor that every kernel applies): the dtype traits `Io`, the constants of one
// call `Consts`, the rounding policies, and the element functor `Elem` with its write `Elem::write<MODE>`.
// The kernels only load, loop, reduce and store around it; csrc/README.md states the semantics.
//
// NO include guard and NO includes on purpose: the file is included inside a namespace by each kernel file
// (fused_cpu_impl.h, i.e. once per CPU instruction set under its `#pragma GCC target`; fused_cuda.cu once), so
// that every function here is compiled for that instruction set and inlined into its loops. The includer first
// includes fused_job.h, <cmath>, <cstdint>, and for fp16 either <cuda_fp16.h> (nvcc) or c10/util/Half.h.

// ---- dtype traits: storage type S as read and written, math type M as computed in -----------------------------

template <typename T>
struct IoSame {
  using S = T;
  using M = T;
  BCD_INLINE static M ld(S v) { return v; }
  BCD_INLINE static S st(M v) { return v; }
};

template <typename T>
struct Io;
template <>
struct Io<float> : IoSame<float> {};
template <>
struct Io<double> : IoSame<double> {};

template <>
struct Io<bcd::BF16Tag> {
  using S = uint16_t;
  using M = float;
  BCD_INLINE static M ld(S v) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
#else
    return __builtin_bit_cast(float, static_cast<uint32_t>(v) << 16);
#endif
  }
  // Round to nearest even, NaN -> 0x7FC0: the bits of c10::BFloat16(float) and of __float2bfloat16 for every
  // non-NaN value, written out so that both backends round the same way without either library.
  BCD_INLINE static S st(M v) {
#ifdef __CUDA_ARCH__
    const uint32_t u = __float_as_uint(v);
#else
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
#endif
    return (v != v) ? static_cast<S>(0x7FC0) : static_cast<S>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

template <>
struct Io<bcd::F16Tag> {
  using S = uint16_t;
  using M = float;
#ifdef __CUDACC__
  // cuda_fp16's round-to-nearest conversions (the ones torch's CUDA kernels use for at::Half)
  BCD_INLINE static M ld(S v) { return __half2float(__ushort_as_half(v)); }
  BCD_INLINE static S st(M v) { return __half_as_ushort(__float2half_rn(v)); }
#else
  // c10's software conversions (the ones torch's CPU kernels use for at::Half)
  BCD_INLINE static M ld(S v) { return c10::detail::fp16_ieee_to_fp32_value(v); }
  BCD_INLINE static S st(M v) { return c10::detail::fp16_ieee_from_fp32_value(v); }
#endif
};

// ---- rounding policies ----------------------------------------------------------------------------------------
// Both backends mirror the reference operation by operation, and both are built without contraction
// (-ffp-contract=off, nvcc -fmad=false: every product and sum is rounded on its own, never an fma), so the only
// place the two references round differently is the division of a tensor by a Python scalar, the Adam bias
// corrections m / (1 - b1^t) and v / (1 - b2^t). The policy is a template parameter of `Elem`; each kernel file
// names its own.

// torch's CPU kernels divide: v / c.
struct TorchCpuRounding {
  template <typename M>
  BCD_INLINE static M div_scalar(M v, M c, M /*inv_c*/) { return v / c; }
};

// torch's CUDA div_true_kernel multiplies by the reciprocal, a * (opmath(1) / opmath(b)), with the reciprocal
// rounded to the math type once (Consts::make computes it on the host).
struct TorchCudaRounding {
  template <typename M>
  BCD_INLINE static M div_scalar(M v, M /*c*/, M inv_c) { return v * inv_c; }
};

BCD_INLINE float msqrt(float v) {
#ifdef __CUDA_ARCH__
  return sqrtf(v);
#else
  return std::sqrt(v);
#endif
}
BCD_INLINE double msqrt(double v) {
#ifdef __CUDA_ARCH__
  return sqrt(v);
#else
  return std::sqrt(v);
#endif
}

// ---- the constants of one call --------------------------------------------------------------------------------
// The Job holds them in double; they are rounded to the math type here, once, exactly where the reference rounds
// its Python floats (a float tensor op with a Python scalar computes in float).
template <typename M>
struct Consts {
  M lr, lam, mu, b1, omb1, b2, omb2, c1, c2, inv_c1, inv_c2, eps, gamma;

  static Consts make(const bcd::Job& j) {
    Consts k;
    k.lr = static_cast<M>(j.lr);
    k.lam = static_cast<M>(j.lam);
    k.mu = static_cast<M>(j.mu);
    k.b1 = static_cast<M>(j.b1);
    k.omb1 = static_cast<M>(j.omb1);
    k.b2 = static_cast<M>(j.b2);
    k.omb2 = static_cast<M>(j.omb2);
    k.c1 = static_cast<M>(j.c1);
    k.c2 = static_cast<M>(j.c2);
    k.inv_c1 = M(1) / k.c1;  // for TorchCudaRounding
    k.inv_c2 = M(1) / k.c2;
    k.eps = static_cast<M>(j.eps);
    k.gamma = static_cast<M>(j.gamma);
    return k;
  }
};

// ---- the element functor --------------------------------------------------------------------------------------

// What one element of one step produces: the new point, the new state, and its two norm contributions.
template <typename M>
struct Next {
  M x;   // x_new
  M s0;  // momentum buffer, or adam m (unchanged for the other forms)
  M s1;  // adam v
  M rr;  // r * r, with r = g + lam * (x - a)   (0 for kDamp)
  M dd;  // d * d, with d = x - a
};

// One element of form FORM (bcd::Form; NEST: nesterov momentum) for element type T, rounding as `Policy`.
// Per element, in the math type M, at the pre-step point:
//   d = x - a;  r = g + lam * d;  rr = r * r;  dd = d * d
//   sgd:      x_new = x - lr * r
//   momentum: b = mu * buf + r;  buf = b;  x_new = x - lr * (nesterov ? r + mu * b : b)
//   adam:     m = b1 m + (1-b1) r;  v = b2 v + ((1-b2) r) r;
//             x_new = x - (lr * div(m, c1)) / (sqrt(div(v, c2)) + eps)      (div: Policy::div_scalar)
//   norms:    x_new = x   (the inexactness rule's pass, and a step whose skip flag is set)
//   damp:     x_new = x   (no norms)
// A pure function of its arguments (no references), so the CPU loop around it stays a plain `omp simd` loop.
template <typename T, int FORM, bool NEST, typename Policy>
struct Elem {
  using IO = Io<T>;
  using S = typename IO::S;
  using M = typename IO::M;
  // which operands the form reads besides x and a, and whether it produces norms
  static constexpr bool kReadsG = FORM != bcd::kDamp;
  static constexpr bool kNorms = FORM != bcd::kDamp;
  static constexpr bool kState0 = FORM == bcd::kMomentum || FORM == bcd::kAdam;
  static constexpr bool kState1 = FORM == bcd::kAdam;

  Consts<M> k;

  BCD_INLINE Next<M> operator()(M xm, M am, M gm, M s0, M s1) const {
    Next<M> o{xm, s0, s1, M(0), M(0)};
    if constexpr (FORM != bcd::kDamp) {
      const M d = xm - am;
      const M r = gm + k.lam * d;
      o.rr = r * r;
      o.dd = d * d;
      if constexpr (FORM == bcd::kSgd) {
        o.x = xm - k.lr * r;
      } else if constexpr (FORM == bcd::kMomentum) {
        const M b = k.mu * s0 + r;
        o.s0 = b;
        if constexpr (NEST) {
          o.x = xm - k.lr * (r + k.mu * b);
        } else {
          o.x = xm - k.lr * b;
        }
      } else if constexpr (FORM == bcd::kAdam) {
        const M mn = k.b1 * s0 + k.omb1 * r;
        const M vn = k.b2 * s1 + k.omb2 * r * r;
        o.s0 = mn;
        o.s1 = vn;
        const M mhat = Policy::div_scalar(mn, k.c1, k.inv_c1);
        const M vhat = Policy::div_scalar(vn, k.c2, k.inv_c2);
        o.x = xm - k.lr * mhat / (msqrt(vhat) + k.eps);
      }
    }
    return o;
  }

  // The write of one element for MODE (bcd::Mode), into the storage slots of x and out:
  //   kPlain: x <- x_new;  kDamped: x <- a + gamma (x_new - a);  kDampedOut: out <- that, x <- a (the stored bits
  //   `a_raw`, so the restore is exact);  kOut: out <- x_new, x <- a (exact);  kNone: nothing.
  // `os` is only written for kDampedOut and kOut (bcd::writes_out): callers pass the x slot again otherwise.
  template <int MODE>
  BCD_INLINE void write(S& xs, S& os, S a_raw, M am, M xn) const {
    if constexpr (MODE == bcd::kPlain) {
      xs = IO::st(xn);
    } else if constexpr (MODE == bcd::kDamped) {
      xs = IO::st(am + k.gamma * (xn - am));
    } else if constexpr (MODE == bcd::kDampedOut) {
      os = IO::st(am + k.gamma * (xn - am));
      xs = a_raw;
    } else if constexpr (MODE == bcd::kOut) {
      os = IO::st(xn);
      xs = a_raw;
    } else {
      (void)xs, (void)os, (void)a_raw, (void)am, (void)xn;  // kNone: the norms only
    }
  }
};
