// The `cuda` backend of bcdcore.ops: fused proximal step (SGD, momentum, Adam forms), damping, and the damped
// write fused into the step, in one pass over memory. Deliberately free of torch headers (nvcc compiles it in
// seconds); fused_cuda_bind.cpp validates the tensors and calls launch().
//
// Memory access: 16-byte vector loads and stores (float4-sized: 4 fp32, 8 bf16/fp16, 2 fp64 elements) over the
// part of the buffers that is 16-byte aligned in every operand, after a scalar head that brings x to a 16-byte
// boundary; head, tail, and operands whose alignments cannot agree go through the scalar path. Grid-stride
// loop, two vectors in flight per thread, grid sized by the occupancy of the kernel on the device.
//
// Reduction: each thread accumulates in the math type, each block reduces in double through warp shuffles in a
// fixed pattern and writes one partial per norm; finalize_kernel (one block) sums the partials in a fixed order.
// The grid size depends only on n, the alignment and the device, so results are bitwise reproducible.
//
// The inexactness rule (csrc/README.md): the norms pass is the kNorms form with mode kNone, whose finalize
// kernel updates the rule state on the device; a step given that state as `skip` reads its flag in the kernel
// and, when set, runs as the norms form plus its damped write. No host synchronisation is involved.
//
// Arithmetic: the per-element math is fused_math.h's `Elem`, shared with the CPU kernel, with the rounding
// policy TorchCudaRounding: it mirrors torch's own CUDA kernels operation by operation (built with -fmad=false so
// nothing is fused), and torch divides a CUDA tensor by a Python scalar as a multiplication by the reciprocal,
// so the Adam bias corrections are applied as m * (1 / c1) with 1 / c1 rounded to the math type on the host.
// The dispatch from a Job to a kernel instantiation is fused_dispatch.h's, shared with the CPU kernel.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "fused_cuda.h"
#include "fused_dispatch.h"
#include "fused_job.h"

namespace bcd_cuda {
namespace {

#include "fused_math.h"

constexpr int kThreads = 256;
constexpr int kUnroll = 2;
constexpr int kMaxBlocksPerSM = 2048 / kThreads;
constexpr int kMaxDevices = 64;

template <typename S, typename M>
struct Ptrs {
  S* x;
  const S* g;
  const S* a;
  S* out;
  M* s0;
  M* s1;
};

// Fixed-pattern block sum of two doubles; the result is valid in thread 0. Every thread must call it.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
  __shared__ double sa[kThreads / 32];
  __shared__ double sb[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? sa[lane] : 0.0;
    b = lane < kThreads / 32 ? sb[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
  }
}

template <typename S>
union VecS {
  uint4 u;
  S s[16 / sizeof(S)];
};

template <typename M, int V>
union VecM {
  uint4 u[V * sizeof(M) / 16];
  M m[V];
};

// Elements [head, head + nvec * V) are processed as 16-byte vectors, the rest ([0, head) and the tail) one by
// one. For the step forms, block b writes its partials to partials[b] (||r||^2) and partials[gridDim.x + b].
template <typename T, int FORM, int MODE, bool NEST>
__device__ __forceinline__ void body(Ptrs<typename Io<T>::S, typename Io<T>::M> p, Consts<typename Io<T>::M> k,
                                     int64_t n, int64_t head, int64_t nvec, double* __restrict__ partials) {
  using Op = Elem<T, FORM, NEST, TorchCudaRounding>;
  using IO = typename Op::IO;
  using S = typename Op::S;
  using M = typename Op::M;
  constexpr int V = 16 / sizeof(S);
  constexpr int NS = V * sizeof(M) / 16;
  constexpr bool kG = Op::kReadsG;
  constexpr bool kS0 = Op::kState0;
  constexpr bool kS1 = Op::kState1;
  const Op op{k};

  S* __restrict__ x = p.x;
  const S* __restrict__ g = p.g;
  const S* __restrict__ a = p.a;
  S* __restrict__ out = p.out;
  M* __restrict__ s0 = p.s0;
  M* __restrict__ s1 = p.s1;

  M r2 = 0, d2 = 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  // vector body
  uint4* __restrict__ xv = reinterpret_cast<uint4*>(x + head);
  const uint4* __restrict__ gv = reinterpret_cast<const uint4*>(kG ? g + head : a + head);
  const uint4* __restrict__ av = reinterpret_cast<const uint4*>(a + head);
  uint4* __restrict__ ov = reinterpret_cast<uint4*>(MODE == bcd::kDampedOut ? out + head : x + head);
  uint4* __restrict__ s0v = reinterpret_cast<uint4*>(kS0 ? s0 + head : nullptr);
  uint4* __restrict__ s1v = reinterpret_cast<uint4*>(kS1 ? s1 + head : nullptr);
  for (int64_t v0 = tid; v0 < nvec; v0 += kUnroll * stride) {
    VecS<S> X[kUnroll], G[kUnroll], A[kUnroll];
    VecM<M, V> B0[kUnroll], B1[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * stride;
      if (v < nvec) {
        X[u].u = xv[v];
        A[u].u = __ldg(av + v);
        if constexpr (kG) G[u].u = __ldg(gv + v);
        if constexpr (kS0) {
#pragma unroll
          for (int q = 0; q < NS; ++q) B0[u].u[q] = s0v[v * NS + q];
        }
        if constexpr (kS1) {
#pragma unroll
          for (int q = 0; q < NS; ++q) B1[u].u[q] = s1v[v * NS + q];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = v0 + u * stride;
      if (v < nvec) {
        VecS<S> XO, OO;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const M xm = IO::ld(X[u].s[e]);
          const M am = IO::ld(A[u].s[e]);
          M gm = M(0), t0 = M(0), t1 = M(0);
          if constexpr (kG) gm = IO::ld(G[u].s[e]);
          if constexpr (kS0) t0 = B0[u].m[e];
          if constexpr (kS1) t1 = B1[u].m[e];
          const Next<M> o = op(xm, am, gm, t0, t1);
          if constexpr (Op::kNorms) {
            r2 += o.rr;
            d2 += o.dd;
          }
          if constexpr (kS0) B0[u].m[e] = o.s0;
          if constexpr (kS1) B1[u].m[e] = o.s1;
          op.template write<MODE>(XO.s[e], OO.s[e], A[u].s[e], am, o.x);
        }
        if constexpr (MODE == bcd::kDampedOut) ov[v] = OO.u;
        if constexpr (MODE != bcd::kNone) xv[v] = XO.u;
        if constexpr (kS0) {
#pragma unroll
          for (int q = 0; q < NS; ++q) s0v[v * NS + q] = B0[u].u[q];
        }
        if constexpr (kS1) {
#pragma unroll
          for (int q = 0; q < NS; ++q) s1v[v * NS + q] = B1[u].u[q];
        }
      }
    }
  }

  // scalar head and tail
  const int64_t body_end = head + nvec * V;
  const int64_t rem = n - nvec * V;
  for (int64_t j = tid; j < rem; j += stride) {
    const int64_t i = j < head ? j : body_end + (j - head);
    const M xm = IO::ld(x[i]);
    const M am = IO::ld(a[i]);
    M gm = M(0), t0 = M(0), t1 = M(0);
    if constexpr (kG) gm = IO::ld(g[i]);
    if constexpr (kS0) t0 = s0[i];
    if constexpr (kS1) t1 = s1[i];
    const Next<M> o = op(xm, am, gm, t0, t1);
    if constexpr (Op::kNorms) {
      r2 += o.rr;
      d2 += o.dd;
    }
    if constexpr (kS0) s0[i] = o.s0;
    if constexpr (kS1) s1[i] = o.s1;
    op.template write<MODE>(x[i], MODE == bcd::kDampedOut ? out[i] : x[i], a[i], am, o.x);
  }

  if constexpr (Op::kNorms) {
    double ra = static_cast<double>(r2), da = static_cast<double>(d2);
    block_sum2(ra, da);
    if (threadIdx.x == 0) {
      partials[blockIdx.x] = ra;
      partials[gridDim.x + blockIdx.x] = da;
    }
  }
}

// The kernel of one step. A step form given a rule state (`skip`) whose stopped flag is set runs as the norms
// pass plus its damped write, if any: the flag lives on the device and every block reads it (the same value,
// so the branch is uniform), so the host never waits for the rule's decision. The norms are still produced.
template <typename T, int FORM, int MODE, bool NEST>
__global__ void __launch_bounds__(kThreads)
    fused_kernel(Ptrs<typename Io<T>::S, typename Io<T>::M> p, Consts<typename Io<T>::M> k, int64_t n,
                 int64_t head, int64_t nvec, double* __restrict__ partials, const double* __restrict__ skip) {
  if constexpr (FORM == bcd::kSgd || FORM == bcd::kMomentum || FORM == bcd::kAdam) {
    if (skip != nullptr && *skip != 0.0) {
      body<T, bcd::kNorms, bcd::skipped_mode(MODE), false>(p, k, n, head, nvec, partials);
      return;
    }
  }
  body<T, FORM, MODE, NEST>(p, k, n, head, nvec, partials);
}

// Second stage: one block sums the nblocks partials of each norm in a fixed order; a rule_check call also
// updates its rule state there (bcd::rule_update), on the device.
template <typename M>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const double* __restrict__ partials, int nblocks, M* __restrict__ r2, M* __restrict__ d2,
                    double* __restrict__ rule, double coef, int64_t index) {
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < nblocks; i += kThreads) {
    a += partials[i];
    b += partials[nblocks + i];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    const M r2m = static_cast<M>(a), d2m = static_cast<M>(b);
    *r2 = r2m;
    *d2 = d2m;
    if (rule != nullptr) bcd::rule_update(rule, static_cast<double>(r2m), static_cast<double>(d2m), coef, index);
  }
}

int sm_count(int device) {
  static int cache[kMaxDevices] = {0};
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) return cache[device];
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v < 1) {
    (void)cudaGetLastError();
    v = 1;
  }
  if (device >= 0 && device < kMaxDevices) cache[device] = v;
  return v;
}

template <typename T, int FORM, int MODE, bool NEST>
cudaError_t grid_cap(int device, int* cap) {
  static int cache[kMaxDevices] = {0};
  if (device >= 0 && device < kMaxDevices && cache[device] > 0) {
    *cap = cache[device];
    return cudaSuccess;
  }
  int per_sm = 0;
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_kernel<T, FORM, MODE, NEST>, kThreads, 0);
  if (err != cudaSuccess) return err;
  per_sm = std::max(1, std::min(per_sm, kMaxBlocksPerSM));
  *cap = per_sm * sm_count(device);
  if (device >= 0 && device < kMaxDevices) cache[device] = *cap;
  return cudaSuccess;
}

inline bool aligned_at(const void* ptr, int64_t head, size_t esz) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(head) * esz) % 16 == 0;
}

// The launch of one dtype/form/mode (the kernel, then the finalize kernel for the forms with norms);
// instantiated by bcd::dispatch (fused_dispatch.h), the ladder the CPU kernel uses too.
template <typename T, int FORM, int MODE, bool NEST>
struct Launch {
  static cudaError_t run(const bcd::Job& job, int device, cudaStream_t stream, double* partials, void* r2,
                         void* d2) {
    using S = typename Io<T>::S;
    using M = typename Io<T>::M;
    constexpr int V = 16 / sizeof(S);
    const int64_t n = job.n;
    Ptrs<S, M> p{static_cast<S*>(job.x), static_cast<const S*>(job.g), static_cast<const S*>(job.a),
                 static_cast<S*>(job.out), static_cast<M*>(job.s0), static_cast<M*>(job.s1)};
    const Consts<M> k = Consts<M>::make(job);

    // vector layout: peel `head` elements so that x is 16-byte aligned; vectorise when every operand then is
    int64_t head = n, nvec = 0;
    const uintptr_t ax = reinterpret_cast<uintptr_t>(job.x);
    if (ax % sizeof(S) == 0) {
      const int64_t h = static_cast<int64_t>(((16 - ax % 16) % 16) / sizeof(S));
      if (h < n && aligned_at(job.g, h, sizeof(S)) && aligned_at(job.a, h, sizeof(S)) &&
          aligned_at(job.out, h, sizeof(S)) && aligned_at(job.s0, h, sizeof(M)) && aligned_at(job.s1, h, sizeof(M))) {
        head = h;
        nvec = (n - h) / V;
      }
    }

    int blocks = 0;
    if (n > 0) {
      const int64_t rem = n - nvec * V;
      const int64_t work = std::max((nvec + kUnroll - 1) / kUnroll, rem);
      int cap = 1;
      cudaError_t err = grid_cap<T, FORM, MODE, NEST>(device, &cap);
      if (err != cudaSuccess) return err;
      blocks = static_cast<int>(std::min<int64_t>((work + kThreads - 1) / kThreads, cap));
      blocks = std::max(blocks, 1);
      fused_kernel<T, FORM, MODE, NEST><<<blocks, kThreads, 0, stream>>>(p, k, n, head, nvec, partials, job.skip);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    if constexpr (FORM != bcd::kDamp) {
      finalize_kernel<M><<<1, kThreads, 0, stream>>>(partials, blocks, static_cast<M*>(r2), static_cast<M*>(d2),
                                                     job.rule, job.coef, job.index);
      return cudaGetLastError();
    }
    return cudaSuccess;
  }

  // kNone with a step form: the bindings never produce it (a skipped step is decided in the kernel).
  static cudaError_t unsupported(const bcd::Job&, int, cudaStream_t, double*, void*, void*) {
    return cudaErrorInvalidValue;
  }
};

}  // namespace

int max_blocks(int device) { return sm_count(device) * kMaxBlocksPerSM; }

cudaError_t launch(const bcd::Job& job, int device, cudaStream_t stream, double* partials, void* r2, void* d2) {
  return bcd::dispatch<Launch>(job, device, stream, partials, r2, d2);
}

}  // namespace bcd_cuda
