// bcd::Job: everything a fused-step kernel needs for one call (raw pointers, constants, size). Free of torch
// headers so that the CUDA translation unit (fused_cuda.cu) compiles quickly with nvcc alone.
#pragma once

#include <cstdint>

namespace bcd {

enum DType : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };
enum Form : int { kSgd = 0, kMomentum = 1, kAdam = 2, kDamp = 3 };
// kPlain: x <- x_new.  kDamped: x <- a + gamma (x_new - a).  kDampedOut: out <- a + gamma (x_new - a), x <- a.
enum Mode : int { kPlain = 0, kDamped = 1, kDampedOut = 2 };

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
  double lr = 0, lam = 0, mu = 0, b1 = 0, omb1 = 0, b2 = 0, omb2 = 0, c1 = 1, c2 = 1, eps = 0, gamma = 1;
  int64_t n = 0;
};

}  // namespace bcd
