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

#include "fused_cuda_body.h"

// The kernel of one step. A step form given a rule state (`skip`) whose stopped flag is set runs as the norms
// pass plus its damped write, if any: the flag lives on the device and every block reads it (the same value,
// so the branch is uniform), so the host never waits for the rule's decision. The norms are still produced.
template <typename T, int FORM, int MODE, bool NEST>
__global__ void __launch_bounds__(kThreads)
    fused_kernel(Ptrs<typename Io<T>::S, typename Io<T>::M> p, Consts<typename Io<T>::M> k, int64_t n,
                 int64_t head, int64_t nvec, double* __restrict__ partials, const double* __restrict__ skip) {
  if constexpr (FORM == bcd::kSgd || FORM == bcd::kMomentum || FORM == bcd::kAdam) {
    if (skip != nullptr && *skip != 0.0) {
      body<T, bcd::kNorms, bcd::skipped_mode(MODE), false>(p, k, n, head, nvec, partials, blockIdx.x, gridDim.x);
      return;
    }
  }
  body<T, FORM, MODE, NEST>(p, k, n, head, nvec, partials, blockIdx.x, gridDim.x);
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

// The launch of one dtype/form/mode (the kernel, then the finalize kernel for the forms with norms);
// instantiated by bcd::dispatch (fused_dispatch.h), the ladder the CPU kernel uses too.
template <typename T, int FORM, int MODE, bool NEST>
struct Launch {
  static cudaError_t run(const bcd::Job& job, int device, cudaStream_t stream, double* partials, void* r2,
                         void* d2) {
    using S = typename Io<T>::S;
    using M = typename Io<T>::M;
    const int64_t n = job.n;
    Ptrs<S, M> p{static_cast<S*>(job.x), static_cast<const S*>(job.g), static_cast<const S*>(job.a),
                 static_cast<S*>(job.out), static_cast<M*>(job.s0), static_cast<M*>(job.s1)};
    const Consts<M> k = Consts<M>::make(job);
    int cap = 1;
    if (n > 0) {
      const cudaError_t err = grid_cap<T, FORM, MODE, NEST>(device, &cap);
      if (err != cudaSuccess) return err;
    }
    const Layout l = layout_of(p, n, cap);
    const int blocks = l.blocks;
    if (blocks > 0) {
      fused_kernel<T, FORM, MODE, NEST><<<blocks, kThreads, 0, stream>>>(p, k, n, l.head, l.nvec, partials, job.skip);
      const cudaError_t err = cudaGetLastError();
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


// ---- multi-slice: many disjoint slices of the flat buffers, each with its own lam and gamma, in one launch ----
// The slices of one launch travel in the kernel's parameters (by value: nothing to copy to the device first, and
// a CUDA graph captures them with the kernel); more than kMaxSlices slices take one launch per kMaxSlices.
// Slice s owns blocks [first[s], first[s+1]) and walks its elements exactly as a one-buffer launch on it would
// (same layout, same grid, same reduction), so its values and norms are the bits of that launch.
template <typename M>
struct SliceTable {
  int count;
  int first[kMaxSlices + 1];
  int64_t start[kMaxSlices];
  int64_t n[kMaxSlices];
  int64_t head[kMaxSlices];
  int64_t nvec[kMaxSlices];
  M lam[kMaxSlices];
  M gamma[kMaxSlices];
};

template <typename T, int FORM, int MODE, bool NEST>
__global__ void __launch_bounds__(kThreads)
    multi_kernel(Ptrs<typename Io<T>::S, typename Io<T>::M> p, Consts<typename Io<T>::M> k,
                 const SliceTable<typename Io<T>::M> t, double* __restrict__ partials) {
  int s = 0;  // the slice of this block (at most kMaxSlices: a linear scan; empty slices own no block)
  while (s + 1 < t.count && static_cast<int>(blockIdx.x) >= t.first[s + 1]) ++s;
  const int64_t b0 = t.first[s], nb = t.first[s + 1] - b0;
  const int64_t o = t.start[s];
  Ptrs<typename Io<T>::S, typename Io<T>::M> q{p.x + o, p.g ? p.g + o : nullptr, p.a + o, p.out ? p.out + o : nullptr,
                                               p.s0 ? p.s0 + o : nullptr, p.s1 ? p.s1 + o : nullptr};
  Consts<typename Io<T>::M> kk = k;
  kk.lam = t.lam[s];
  kk.gamma = t.gamma[s];
  body<T, FORM, MODE, NEST>(q, kk, t.n[s], t.head[s], t.nvec[s], partials + 2 * b0, blockIdx.x - b0, nb);
}

// Second stage of a multi-slice launch: block s sums slice s's partials in the order finalize_kernel does.
template <typename M>
__global__ void __launch_bounds__(kThreads)
    multi_finalize_kernel(const double* __restrict__ partials, const SliceTable<M> t, M* __restrict__ r2,
                          M* __restrict__ d2) {
  const int s = blockIdx.x;
  const int b0 = t.first[s], nb = t.first[s + 1] - b0;
  const double* pp = partials + 2 * b0;
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < nb; i += kThreads) {
    a += pp[i];
    b += pp[nb + i];
  }
  block_sum2(a, b);
  if (threadIdx.x == 0) {
    r2[s] = static_cast<M>(a);
    d2[s] = static_cast<M>(b);
  }
}

template <typename T, int FORM, int MODE, bool NEST>
struct LaunchMulti {
  static cudaError_t run(const bcd::Job& job, const bcd::Slices& sl, int device, cudaStream_t stream,
                         double* partials, void* r2, void* d2) {
    if constexpr (FORM == bcd::kNorms || MODE == bcd::kNone) {  // no rule pass in the multi-slice form
      return cudaErrorInvalidValue;
    } else {
      using S = typename Io<T>::S;
      using M = typename Io<T>::M;
      const Ptrs<S, M> p{static_cast<S*>(job.x), static_cast<const S*>(job.g), static_cast<const S*>(job.a),
                         static_cast<S*>(job.out), static_cast<M*>(job.s0), static_cast<M*>(job.s1)};
      const Consts<M> k = Consts<M>::make(job);
      int cap = 1;
      cudaError_t err = grid_cap<T, FORM, MODE, NEST>(device, &cap);
      if (err != cudaSuccess) return err;
      for (int64_t g0 = 0; g0 < sl.count; g0 += kMaxSlices) {
        SliceTable<M> t;
        t.count = static_cast<int>(std::min<int64_t>(kMaxSlices, sl.count - g0));
        t.first[0] = 0;
        for (int s = 0; s < t.count; ++s) {
          const int64_t o = sl.start[g0 + s], n = sl.n[g0 + s];
          const Ptrs<S, M> q{p.x + o, p.g ? p.g + o : nullptr, p.a + o, p.out ? p.out + o : nullptr,
                             p.s0 ? p.s0 + o : nullptr, p.s1 ? p.s1 + o : nullptr};
          const Layout l = layout_of(q, n, cap);
          t.start[s] = o;
          t.n[s] = n;
          t.head[s] = l.head;
          t.nvec[s] = l.nvec;
          t.first[s + 1] = t.first[s] + l.blocks;
          t.lam[s] = static_cast<M>(sl.lam[g0 + s]);
          t.gamma[s] = static_cast<M>(sl.gamma ? sl.gamma[g0 + s] : job.gamma);
        }
        for (int s = t.count + 1; s <= kMaxSlices; ++s) t.first[s] = t.first[t.count];
        if (t.first[t.count] > 0) {
          multi_kernel<T, FORM, MODE, NEST><<<t.first[t.count], kThreads, 0, stream>>>(p, k, t, partials);
          err = cudaGetLastError();
          if (err != cudaSuccess) return err;
        }
        if constexpr (FORM != bcd::kDamp) {
          multi_finalize_kernel<M><<<t.count, kThreads, 0, stream>>>(partials, t, static_cast<M*>(r2) + g0,
                                                                     static_cast<M*>(d2) + g0);
          err = cudaGetLastError();
          if (err != cudaSuccess) return err;
        }
      }
      return cudaSuccess;
    }
  }

  static cudaError_t unsupported(const bcd::Job&, const bcd::Slices&, int, cudaStream_t, double*, void*, void*) {
    return cudaErrorInvalidValue;
  }
};

}  // namespace

int max_blocks(int device) { return sm_count(device) * kMaxBlocksPerSM; }

cudaError_t launch(const bcd::Job& job, int device, cudaStream_t stream, double* partials, void* r2, void* d2) {
  return bcd::dispatch<Launch>(job, device, stream, partials, r2, d2);
}

cudaError_t launch_multi(const bcd::Job& job, const bcd::Slices& slices, int device, cudaStream_t stream,
                         double* partials, void* r2, void* d2) {
  if (slices.count == 0) return cudaSuccess;
  return bcd::dispatch<LaunchMulti>(job, slices, device, stream, partials, r2, d2);
}

}  // namespace bcd_cuda
