// Device-side pieces of the CUDA kernels (fused_cuda.cu): operand pointers, the fixed-pattern block sum, the
// vector unions, the element loop `body` (16-byte vectors around fused_math.h's `Elem`, scalar head and tail,
// per-block partial norms) and the vector layout of one buffer. Shared by the one-buffer kernel and the
// multi-slice kernel, so both walk a slice the same way and a slice of a multi-slice call produces the bits of a
// one-buffer call on it.
//
// NO include guard and NO includes on purpose, like fused_math.h: fused_cuda.cu includes it inside its anonymous
// namespace after fused_math.h and the constants kThreads and kUnroll.

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
// `bid` of `nb` blocks work on these elements (a whole launch, or one slice's share of a multi-slice launch).
template <typename T, int FORM, int MODE, bool NEST>
__device__ __forceinline__ void body(Ptrs<typename Io<T>::S, typename Io<T>::M> p, Consts<typename Io<T>::M> k,
                                     int64_t n, int64_t head, int64_t nvec, double* __restrict__ partials,
                                     int64_t bid, int64_t nb) {
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
  const int64_t tid = bid * blockDim.x + threadIdx.x;
  const int64_t stride = nb * blockDim.x;

  // vector body
  uint4* __restrict__ xv = reinterpret_cast<uint4*>(x + head);
  const uint4* __restrict__ gv = reinterpret_cast<const uint4*>(kG ? g + head : a + head);
  const uint4* __restrict__ av = reinterpret_cast<const uint4*>(a + head);
  uint4* __restrict__ ov = reinterpret_cast<uint4*>(bcd::writes_out(MODE) ? out + head : x + head);
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
        if constexpr (bcd::writes_out(MODE)) ov[v] = OO.u;
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
    op.template write<MODE>(x[i], bcd::writes_out(MODE) ? out[i] : x[i], a[i], am, o.x);
  }

  if constexpr (Op::kNorms) {
    double ra = static_cast<double>(r2), da = static_cast<double>(d2);
    block_sum2(ra, da);
    if (threadIdx.x == 0) {
      partials[bid] = ra;
      partials[nb + bid] = da;
    }
  }
}


inline bool aligned_at(const void* ptr, int64_t head, size_t esz) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(head) * esz) % 16 == 0;
}

// The vector layout of one buffer: peel `head` elements so that x is 16-byte aligned, then `nvec` 16-byte
// vectors when every operand is aligned there too (else everything goes through the scalar path); `blocks` is
// the grid for it under the occupancy cap `cap` (0 for an empty buffer).
struct Layout {
  int64_t head, nvec;
  int blocks;
};

template <typename S, typename M>
Layout layout_of(const Ptrs<S, M>& p, int64_t n, int cap) {
  constexpr int V = 16 / sizeof(S);
  Layout l{n, 0, 0};
  const uintptr_t ax = reinterpret_cast<uintptr_t>(p.x);
  if (ax % sizeof(S) == 0) {
    const int64_t h = static_cast<int64_t>(((16 - ax % 16) % 16) / sizeof(S));
    if (h < n && aligned_at(p.g, h, sizeof(S)) && aligned_at(p.a, h, sizeof(S)) && aligned_at(p.out, h, sizeof(S)) &&
        aligned_at(p.s0, h, sizeof(M)) && aligned_at(p.s1, h, sizeof(M))) {
      l.head = h;
      l.nvec = (n - h) / V;
    }
  }
  if (n > 0) {
    const int64_t rem = n - l.nvec * V;
    const int64_t work = std::max((l.nvec + kUnroll - 1) / kUnroll, rem);
    l.blocks = static_cast<int>(std::max<int64_t>(std::min<int64_t>((work + kThreads - 1) / kThreads, cap), 1));
  }
  return l;
}
