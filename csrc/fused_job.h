// bcd::Job: everything a fused-step kernel needs for one call (raw pointers, constants, size). Free of torch
// headers so that the CUDA translation unit (fused_cuda.cu) compiles quickly with nvcc alone.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define BCD_HOST_DEVICE __host__ __device__
// Per-element code (fused_math.h) must be inlined into the loops of both backends: on the CPU so that GCC still
// vectorises the `omp simd` loop around it exactly as when the math was written in the loop.
#define BCD_INLINE __host__ __device__ __forceinline__
#else
#define BCD_HOST_DEVICE
#define BCD_INLINE inline __attribute__((always_inline))
#endif

namespace bcd {

enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };
// The element types the kernels are instantiated for: float, double, and these tags for the 16-bit storage types
// (held as uint16_t bits; each backend's dtype traits, fused_math.h `Io`, convert them).
struct BF16Tag {};
struct F16Tag {};
// kNorms: the norms pass of the inexactness rule (reads x, g, a; x_new = x, no state): the `rule_check` op with
// mode kNone, and what a step whose `skip` flag is set becomes (its damped write, if any, still happens).
enum Form : int { kSgd = 0, kMomentum = 1, kAdam = 2, kDamp = 3, kNorms = 4 };
// kPlain: x <- x_new.  kDamped: x <- a + gamma (x_new - a).  kDampedOut: out <- a + gamma (x_new - a), x <- a.
// kNone: nothing is written (kNorms only).  kOut: out <- x_new, x <- a (the undamped point moved aside: Jacobi
// defers the damping of every block of a round to one multi-slice write at its end).
enum Mode : int { kPlain = 0, kDamped = 1, kDampedOut = 2, kNone = 3, kOut = 4 };

// Whether MODE writes into `out` (and restores x to the exact bits of a).
BCD_HOST_DEVICE constexpr bool writes_out(int mode) { return mode == kDampedOut || mode == kOut; }

// The mode a step runs with when its `skip` flag is set: the norms form, keeping the damped write (if any) of
// its mode on x_new = x; a plain step then writes nothing. The CPU applies it on the host, the CUDA kernel on the
// device (fused_cuda.cu), so both skip the same way.
BCD_HOST_DEVICE constexpr int skipped_mode(int mode) { return mode == kPlain ? kNone : mode; }

// The rule state of one block solve: 4 doubles on the parameters' device, [stopped, r2, d2, k]. The norms pass
// (`rule_check`, form kNorms) of inner step k writes it while stopped == 0: r2 and d2 of z_k (rounded to the
// math type), k, and stopped = (sqrt(r2) <= coef * sqrt(d2)); once stopped it is left alone, so it describes
// the certified point. A step given it as `skip` is not applied while stopped != 0.
constexpr int kRuleLen = 4;

// Constants are prepared in double on the host and rounded to the math type (float, or double for float64
// parameters) inside the kernels exactly where the reference rounds its Python floats.
struct Job {
  int dtype = kF32;
  int form = kSgd;
  int mode = kPlain;
  bool nesterov = false;
  void* x = nullptr;
  const void* g = nullptr;
  const void* a = nullptr;
  void* out = nullptr;
  void* s0 = nullptr;  // momentum buffer, or adam m
  void* s1 = nullptr;  // adam v
  const double* skip = nullptr;  // a rule state: when skip[0] != 0 the step is not applied (kNorms instead)
  double* rule = nullptr;        // kNorms with a rule state to update (rule_check)
  double coef = 0;               // rule_check: c * lambda
  int64_t index = 0;             // rule_check: the inner step k
  double lr = 0, lam = 0, mu = 0, b1 = 0, omb1 = 0, b2 = 0, omb2 = 0, c1 = 1, c2 = 1, eps = 0, gamma = 1;
  int64_t n = 0;
};

// A multi-slice call: one Job whose pointers are the whole flat buffers, and `count` disjoint slices
// [start, start + n) of them, each with its own lam and gamma (the per-block constants of Algorithm 1); every
// other constant and the write mode are shared. The norms come back per slice. No rule state (skip / rule).
struct Slices {
  int64_t count = 0;
  const int64_t* start = nullptr;
  const int64_t* n = nullptr;
  const double* lam = nullptr;
  const double* gamma = nullptr;
};

// The rule update of a norms pass, shared by the CPU backend and the CUDA finalize kernel (the reference in
// bcdcore/ops.py does the same in float64 torch ops). r2 and d2 arrive already rounded to the math type.
BCD_HOST_DEVICE inline void rule_update(double* rule, double r2, double d2, double coef, int64_t k) {
  if (rule[0] != 0.0) return;  // stopped earlier: keep describing the certified point
  rule[1] = r2;
  rule[2] = d2;
  rule[3] = static_cast<double>(k);
  rule[0] = ::sqrt(r2) <= coef * ::sqrt(d2) ? 1.0 : 0.0;
}

}  // namespace bcd
