// Python module `bcdcore._C_cuda`: validates the tensors (fused_common.h), then runs the CUDA kernels of
// fused_cuda.cu on the current stream of x's device. Importing it needs no GPU; calling it does.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <tuple>

#include "fused_bind.h"
#include "fused_common.h"
#include "fused_cuda.h"

namespace {

// One allocation per call: [r2, d2 (padded to 16 bytes) | 2 * max_blocks double partials]; r2 and d2 are
// returned as 0-dim views of it (the partials are scratch for the kernel, stream-ordered by the allocator).
std::tuple<at::Tensor, at::Tensor> run(const bcd::Job& job, const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  if (job.form == bcd::kDamp) {
    C10_CUDA_CHECK(bcd_cuda::launch(job, device, stream, nullptr, nullptr, nullptr));
    return {};
  }
  const at::ScalarType mt = bcd::math_type(x);
  const int64_t esz = static_cast<int64_t>(c10::elementSize(mt));
  const int64_t head = 16 / esz;  // r2, d2 and padding
  const int64_t n_partials = 2 * static_cast<int64_t>(bcd_cuda::max_blocks(device));
  at::Tensor buf = at::empty({head + n_partials * 8 / esz}, x.options().dtype(mt));
  char* base = static_cast<char*>(buf.data_ptr());
  C10_CUDA_CHECK(bcd_cuda::launch(job, device, stream, reinterpret_cast<double*>(base + 16), base, base + esz));
  return {buf.select(0, 0), buf.select(0, 1)};
}

// A multi-slice call: [r2 | d2] per slice in one math-type allocation, and a scratch buffer of block partials
// for the largest launch (kMaxSlices slices, each at most max_blocks blocks).
std::tuple<at::Tensor, at::Tensor> run_multi(const bcd::Job& job, const bcd::Slices& sl, const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const bool norms = job.form != bcd::kDamp;
  at::Tensor both, scratch;
  char* r2 = nullptr;
  if (norms) {
    both = at::empty({2, sl.count}, x.options().dtype(bcd::math_type(x)));
    const int64_t per_launch = std::min<int64_t>(sl.count, bcd_cuda::kMaxSlices);
    scratch = at::empty({2 * per_launch * bcd_cuda::max_blocks(device)}, x.options().dtype(at::kDouble));
    r2 = static_cast<char*>(both.data_ptr());
  }
  const int64_t esz = norms ? static_cast<int64_t>(both.element_size()) : 0;
  C10_CUDA_CHECK(bcd_cuda::launch_multi(job, sl, device, stream,
                                        norms ? scratch.data_ptr<double>() : nullptr, r2,
                                        norms ? r2 + sl.count * esz : nullptr));
  if (!norms) return {};
  return {both.select(0, 0), both.select(0, 1)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bcd::Ops<c10::DeviceType::CUDA, run, run_multi>::define(
      m, "bcdcore fused proximal update ops, CUDA backend (see csrc/README.md)");
}
